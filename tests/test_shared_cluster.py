"""Runs on clusters they do not own: concurrent runs sharing one cluster, devices resolved on
the workers, the order in which a scheduler is chosen, and the default local cluster started
from a plain script."""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import dask
import dask.threaded
import distributed
import numpy as np
import pytest
import torch
import zarr
from conftest import blocks_run_by

import segpipe
from segpipe import models
from segpipe.execution import allocator, cluster, nannies, plans, tasks, workers
from segpipe.execution.cluster import choose_scheduler
from segpipe.execution.predictor import SHARING_ENV, InferenceConfig
from segpipe.execution.schedulers import WorkersDiedError
from segpipe.execution.workers import ModelPlugin, resolve_amp
from segpipe.results import is_complete, read_meta

CLASSES = ("background", "tissue", "nucleus")
SETTINGS = {"tile": 16, "task_tiles": 1, "probability_dtype": "float32"}


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    image = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "image.zarr"
    arr = zarr.create_array(
        path, shape=image.shape, chunks=(16, 16, 3), dtype="uint8", dimension_names=("y", "x", "c")
    )
    arr[...] = image
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny valid U-Nets with different random weights, saved as checkpoints."""
    folder = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = models.build("unet", class_names=CLASSES, width=4, depth=2, padding="valid")
        paths.append(models.save(net, folder / f"unet-{seed}.pt"))
    return paths


@pytest.fixture
def shared_client():
    """Per test: an open client is the active one, which the scheduler-order tests must not
    meet."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as local,
        distributed.Client(local) as client,
    ):
        yield client


@pytest.fixture
def threaded_client():
    """A cluster of two worker threads in this process: monkeypatches reach its workers."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as local,
        distributed.Client(local) as client,
    ):
        yield client


def stored(out):
    return {
        name: zarr.open_array(out / "0" / name, mode="r")[...] for name in ("probabilities", "mask")
    }


# -- 1. runs sharing a cluster ----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("n_runs", [2, 4])
@pytest.mark.parametrize("same_model", [True, False], ids=["same-model", "other-models"])
def test_concurrent_runs_on_one_cluster_equal_runs_one_after_another(
    image_path, checkpoints, shared_client, tmp_path, n_runs, same_model
):
    ckpts = [checkpoints[0] if same_model else checkpoints[i % 2] for i in range(n_runs)]
    # Alone on the cluster, once a model: the runs of one model have one result to equal.
    alone = {
        c: segpipe.segment(
            image_path, tmp_path / f"seq-{k}.zarr", c, scheduler=shared_client, **SETTINGS
        )
        for k, c in enumerate(dict.fromkeys(ckpts))
    }
    one_by_one = [alone[c] for c in ckpts]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            segpipe.segment(
                image_path,
                tmp_path / f"par-{i}.zarr",
                ckpts[i],
                scheduler=shared_client,
                **SETTINGS,
            )
        except BaseException as err:  # reported below, with the others
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, seq in enumerate(one_by_one):
        par = tmp_path / f"par-{i}.zarr"
        assert is_complete(par)
        for name, expected in stored(seq).items():
            np.testing.assert_array_equal(stored(par)[name], expected, err_msg=f"run {i} {name}")
    if not same_model:
        assert not np.array_equal(
            stored(one_by_one[0])["probabilities"], stored(one_by_one[1])["probabilities"]
        )
    # Every run removed its own plugin, and only its own.
    plugins = shared_client.run(lambda dask_worker: list(dask_worker.plugins))
    assert not any("segpipe" in p for names in plugins.values() for p in names)


def test_a_task_still_running_when_its_run_failed_writes_nothing_after(
    image_path, checkpoints, threaded_client, tmp_path, monkeypatch
):
    """Block (0, 0) fails while block (0, 1) is still on its way to predicting: segment
    raises, and the task Dask could not stop writes nothing afterwards (a new run may have
    made a result at the same path by then) nor starts the run's model thread again."""
    predict_parts, write_block = tasks.predict_parts, tasks.write_block
    started, go_on = threading.Event(), threading.Event()

    def parts(tiles, *args, **kwargs):
        if tiles[0].index == (0, 0):
            started.wait(10)
            raise RuntimeError("block (0, 0) fails")
        if tiles[0].index == (0, 1):
            started.set()
            go_on.wait(10)  # until the run has raised
        yield from predict_parts(tiles, *args, **kwargs)

    writes: list[float] = []

    def recording(*args, **kwargs):
        writes.append(time.monotonic())
        return write_block(*args, **kwargs)

    monkeypatch.setattr(tasks, "predict_parts", parts)
    monkeypatch.setattr(tasks, "write_block", recording)
    with pytest.raises(RuntimeError, match=r"block \(0, 0\) fails"):
        segpipe.segment(
            image_path, tmp_path / "r.zarr", checkpoints[0], scheduler=threaded_client, **SETTINGS
        )
    raised = time.monotonic()
    assert started.is_set(), "block (0, 1) was running when the run failed"
    go_on.set()
    time.sleep(1.0)  # the task runs on, to its end
    assert not [t for t in writes if t > raised]
    assert not [t for t in threading.enumerate() if t.name.startswith("segpipe-model")]
    assert not tasks._LEASES and not tasks._STAGES


def test_a_failing_block_cancels_the_runs_other_blocks(
    image_path, checkpoints, threaded_client, tmp_path, monkeypatch
):
    """Block (0, 0) fails while the others wait to predict or to start: segment raises and
    cancels them all, rather than leave a failed run's blocks taking the shared cluster's
    threads, and the next runs' turn, for nothing."""
    predict_parts, go_on, sent = tasks.predict_parts, threading.Event(), []

    def parts(tiles, *args, **kwargs):
        if tiles[0].index == (0, 0):
            raise RuntimeError("block (0, 0) fails")
        go_on.wait(10)  # until the run has raised
        yield from predict_parts(tiles, *args, **kwargs)

    def mapped(*args, real=threaded_client.map, **kwargs):
        sent.extend(futures := real(*args, **kwargs))
        return futures

    monkeypatch.setattr(tasks, "predict_parts", parts)
    monkeypatch.setattr(threaded_client, "map", mapped)
    try:
        with pytest.raises(RuntimeError, match=r"block \(0, 0\) fails"):
            segpipe.segment(
                image_path, tmp_path / "r.zarr", checkpoints[0], scheduler=threaded_client,
                **SETTINGS,
            )  # fmt: skip
        assert len(sent) == 15, "one block per tile"
        assert [f.key for f in sent if f.status == "pending"] == [], "left to run"
    finally:
        go_on.set()


@pytest.mark.integration
@pytest.mark.integration
def test_a_worker_dying_as_the_model_is_sent_out_leaves_the_run_to_the_others(
    image_path, checkpoints, shared_client, tmp_path
):
    """A worker killed just before the scheduler sends the run's plugin out (it has not seen
    the death yet: an OOM kill) failed the run with a bare CommClosedError, nothing computed,
    the other worker alive. The plugin is sent again; the run finishes, equal to one in this
    process."""
    real, killed = shared_client.register_plugin, []

    def after_a_worker_dies(*args, **kwargs):
        if not killed:
            pid = next(iter(shared_client.run(os.getpid).values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return real(*args, **kwargs)

    shared_client.register_plugin = after_a_worker_dies
    try:
        out = segpipe.segment(
            image_path, tmp_path / "out.zarr", checkpoints[0], scheduler=shared_client, **SETTINGS
        )
    finally:
        shared_client.register_plugin = real
    assert killed and is_complete(out)
    alone = segpipe.segment(
        image_path, tmp_path / "sync.zarr", checkpoints[0], scheduler="sync", **SETTINGS
    )
    for name, values in stored(alone).items():
        np.testing.assert_array_equal(stored(out)[name], values, err_msg=name)


def test_the_plugin_of_a_killed_driver_is_dropped_by_the_next_run(
    image_path, checkpoints, shared_client, tmp_path
):
    """A driver SIGKILLed mid-run never unregisters its plugin: the workers would hold its
    model for ever and load it on every worker that joins. The next run on the cluster drops
    it (its client has left the scheduler), and only it."""
    address = shared_client.scheduler.address
    script = (
        f"import segpipe; segpipe.segment({str(image_path)!r}, {str(tmp_path / 'a.zarr')!r}, "
        f"{str(checkpoints[0])!r}, scheduler={address!r}, **{SETTINGS!r})"
    )
    env = {**os.environ, "SEGPIPE_FAULT": "block.recorded:kill"}  # after its first block
    killed = subprocess.run([sys.executable, "-c", script], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL

    def loaded():
        return {
            k for keys in shared_client.run(lambda: list(tasks._PREDICTORS)).values() for k in keys
        }

    deadline = time.monotonic() + 30
    while not shared_client.run_on_scheduler(workers.orphaned_plugins):
        assert time.monotonic() < deadline, "the scheduler still lists the killed client"
        time.sleep(0.2)
    assert loaded(), "the killed run's model is still on the workers"
    segpipe.segment(
        image_path, tmp_path / "b.zarr", checkpoints[0], scheduler=shared_client, **SETTINGS
    )
    names = shared_client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.worker_plugins)
    )
    assert not [n for n in names if n.startswith(workers.PLUGIN_PREFIX)]
    assert not loaded()
    assert is_complete(tmp_path / "b.zarr")


def test_each_run_has_its_own_predictor_and_threaded_workers_share_it(monkeypatch):
    built = []
    monkeypatch.setattr(workers, "Predictor", lambda net, config: built.append(config) or config)
    net = torch.nn.Identity()
    first = ModelPlugin(workers.run_key("ab" * 32), net, InferenceConfig(device="cpu"))
    second = ModelPlugin(workers.run_key("ab" * 32), net, InferenceConfig(device="cpu"))
    assert first.name != second.name
    # Two workers of one process (a threaded cluster) set up the same run: built once.
    first.setup()
    first.setup()
    second.setup()
    assert len(built) == 2
    first.teardown()
    assert tasks.predictor_for(first.key) is built[0], "the other worker still holds it"
    first.teardown()
    with pytest.raises(RuntimeError, match=f"run {first.key} is not loaded"):
        tasks.predictor_for(first.key)
    assert tasks.predictor_for(second.key) is built[1]
    second.teardown()
    assert tasks._PREDICTORS == {}


# -- 2. the device, resolved on each worker ---------------------------------------------------


@pytest.mark.parametrize(("cuda", "expected"), [(True, "cuda"), (False, "cpu")])
def test_auto_device_is_the_workers_own(monkeypatch, cuda, expected):
    """ "auto" is resolved in the plugin's setup, on the worker, from the worker's torch."""
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(workers, "Predictor", lambda net, config: devices.append(config.device))
    plugin = ModelPlugin("k" * 16, torch.nn.Identity(), InferenceConfig(device="auto"))
    plugin.setup()
    plugin.teardown()
    assert devices == [expected]


def test_cuda_asked_of_workers_without_one_fails_there(
    image_path, checkpoints, threaded_client, tmp_path
):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "r.zarr"
    with pytest.raises(RuntimeError, match=r"worker .*sees no CUDA GPU; run on workers that have"):
        segpipe.segment(
            image_path, out, checkpoints[0], device="cuda", scheduler=threaded_client, **SETTINGS
        )
    # It got as far as the workers (the result was prepared), and left no plugin behind.
    assert read_meta(out).config.device == "cuda"
    plugins = threaded_client.run(lambda dask_worker: list(dask_worker.plugins))
    assert not any("segpipe" in p for names in plugins.values() for p in names)
    with pytest.raises(RuntimeError, match=r"pid \d+: .*sees no CUDA GPU"):
        segpipe.segment(
            image_path,
            tmp_path / "s.zarr",
            checkpoints[0],
            device="cuda",
            scheduler="sync",
            **SETTINGS,
        )


def test_amp_is_resolved_from_the_workers(threaded_client, monkeypatch):
    assert resolve_amp(None, "auto", threaded_client) is False
    assert resolve_amp(None, "auto", None) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_amp(None, "auto", threaded_client) is True
    assert resolve_amp(None, "cuda", None) is True
    assert resolve_amp(None, "cpu", threaded_client) is False
    assert resolve_amp(False, "auto", threaded_client) is False


def test_amp_of_a_cluster_without_workers_must_be_given(monkeypatch):
    monkeypatch.setattr(workers, "WORKERS_WAIT_S", 0.5)
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as local,
        distributed.Client(local) as client,
    ):
        with pytest.raises(ValueError, match=r"GPU \(it had no worker for 0\.5 s\)"):
            resolve_amp(None, "auto", client)
        assert resolve_amp(True, "auto", client) is True


def test_amp_waits_for_a_worker_of_a_cluster_starting_or_restarting_them(monkeypatch):
    """A run started while a shared cluster's nannies restart their workers (or an adaptive
    one starts its first) failed at once: "no workers yet to say whether they have a GPU"."""
    import time
    import types

    def sleep(seconds):
        raise AssertionError("slept though the worker that joined was not yet asked")

    monkeypatch.setattr(workers, "WORKERS_WAIT_S", 60.0)
    monkeypatch.setattr(
        workers, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep)
    )
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as local,
        distributed.Client(local) as client,
    ):
        later = threading.Timer(0.5, local.scale, args=(1,))
        later.start()
        try:
            assert resolve_amp(None, "auto", client) is False  # this CPU worker's answer
        finally:
            later.cancel()
        assert len(client.nthreads()) == 1


def test_exact_windows_are_sized_by_workers_that_join_after_the_run_started(
    image_path, checkpoints, tmp_path
):
    """A scheduler whose workers are not up yet when the run starts (adaptive, starting): each
    worker sizes the run's windows from its own device when it joins, one side for all its
    blocks, not a window per tile for the whole run."""
    settings = {**SETTINGS, "task_tiles": 2, "device": "cpu"}
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as local,
        concurrent.futures.ThreadPoolExecutor(1) as driver,
    ):
        run = driver.submit(
            segpipe.segment, image_path, tmp_path / "r.zarr", checkpoints[0],
            scheduler=local.scheduler_address, **settings,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not local.scheduler.tasks and not run.done() and time.monotonic() < deadline:
            time.sleep(0.05)  # the blocks sent, to no worker
        local.scale(1)
        out = run.result(timeout=60)
    # 48 x 80 px in blocks of 2 x 2 tiles of 16 px: 2 x 3 blocks, a window each (15 tiles).
    assert read_meta(out).summary.windows == 6


# -- 3. which scheduler ----------------------------------------------------------------------


@pytest.fixture
def no_config_address(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    dask.config.refresh()
    yield monkeypatch
    monkeypatch.undo()
    dask.config.refresh()


def test_scheduler_order(no_config_address):
    monkeypatch = no_config_address
    assert choose_scheduler() is None, "nothing set: a local cluster"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    dask.config.refresh()
    assert choose_scheduler() == "tcp://10.0.0.1:8786"
    with (
        distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as local,
        distributed.Client(local) as client,
    ):
        assert choose_scheduler() is client, "an active client beats the config"
        assert choose_scheduler("sync") == "sync", "an explicit choice beats all"
        assert choose_scheduler("tcp://10.0.0.2:8786") == "tcp://10.0.0.2:8786"
    assert choose_scheduler() == "tcp://10.0.0.1:8786"


def _no_local_cluster(plan):
    raise AssertionError("a local cluster was started")


def test_segment_uses_the_active_client(image_path, checkpoints, no_config_address, tmp_path):
    no_config_address.setattr(cluster, "_start_local_cluster", _no_local_cluster)
    with (
        distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as local,
        distributed.Client(local),  # the active client
    ):
        out = segpipe.segment(image_path, tmp_path / "r.zarr", checkpoints[0], **SETTINGS)
        assert is_complete(out)
        assert blocks_run_by(local.scheduler_address) > 0, "the run went elsewhere"


def test_segment_uses_the_configured_address(image_path, checkpoints, no_config_address, tmp_path):
    no_config_address.setattr(cluster, "_start_local_cluster", _no_local_cluster)
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as local:
        no_config_address.setenv("DASK_SCHEDULER_ADDRESS", local.scheduler_address)
        dask.config.refresh()
        out = segpipe.segment(image_path, tmp_path / "r.zarr", checkpoints[0], **SETTINGS)
        assert blocks_run_by(local.scheduler_address) > 0, "the run went elsewhere"
    assert is_complete(out)


def test_segment_inside_a_task_gives_its_thread_back(
    image_path, checkpoints, no_config_address, tmp_path
):
    """A prefect-dask task runner calls segment inside a Dask task: with no scheduler given it
    takes the worker's client, and its blocks need a thread of that worker. On a worker of
    one thread a task that waited in it would wait for ever."""
    no_config_address.setattr(cluster, "_start_local_cluster", _no_local_cluster)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as local,
        distributed.Client(local) as client,
    ):
        run = client.submit(
            segpipe.segment, image_path, tmp_path / "r.zarr", checkpoints[0], pure=False, **SETTINGS
        )
        out = run.result(timeout=60)
    assert is_complete(out)


def test_a_run_whose_tasks_cannot_be_sent_leaves_no_plugin(
    image_path, checkpoints, threaded_client, monkeypatch, tmp_path
):
    """client.map pickles the tasks in the driver and may raise: the plugin registered just
    before is dropped all the same."""

    def unsendable(*args, **kwargs):
        raise TypeError("cannot pickle '_thread.lock' object")

    monkeypatch.setattr(threaded_client, "map", unsendable)
    with pytest.raises(TypeError, match="cannot pickle"):
        segpipe.segment(
            image_path, tmp_path / "r.zarr", checkpoints[0], scheduler=threaded_client, **SETTINGS
        )
    names = threaded_client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.worker_plugins)
    )
    assert not [n for n in names if n.startswith(workers.PLUGIN_PREFIX)]
    assert not {
        k for keys in threaded_client.run(lambda: list(tasks._PREDICTORS)).values() for k in keys
    }


def test_a_run_whose_plugin_cannot_be_unregistered_still_succeeds(
    image_path, checkpoints, threaded_client, monkeypatch, tmp_path
):
    """A worker killed after the last block fails the scheduler's broadcast of the plugin's
    removal (CommClosedError): the run's result is complete all the same, and said."""
    from distributed.comm.core import CommClosedError

    def closed(name, *args, **kwargs):
        raise CommClosedError("in <TCP (closed) ...>: Stream is closed")

    said = []  # not caplog: the CLI's tests leave segpipe's loggers not propagating
    monkeypatch.setattr(threaded_client, "unregister_worker_plugin", closed)
    monkeypatch.setattr(cluster.log, "warning", lambda *args: said.append(args[0] % args[1:]))
    out = segpipe.segment(
        image_path, tmp_path / "r.zarr", checkpoints[0], scheduler=threaded_client, **SETTINGS
    )
    assert segpipe.results.is_complete(out)
    assert any(line.startswith("could not unregister segpipe-model-") for line in said)


# -- 4 and 5. the default local cluster from a plain script ------------------------------------


def test_a_run_in_this_process_gives_torch_threads_back(image_path, checkpoints, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        segpipe.segment(
            image_path, tmp_path / "r.zarr", checkpoints[0], scheduler="sync", **SETTINGS
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_cpu_local_cluster_gives_the_callers_torch_threads_back():
    """Its workers are threads of this process, and torch's thread count is process-wide:
    the cluster's plan sets it while the cluster is up, and the caller's count is given back
    when it closes (an archive run's flow went on with the plan's, all the cores)."""
    before = torch.get_num_threads()
    plan = cluster.ClusterPlan(n_workers=1, threads_per_worker=1, torch_threads=2)
    torch.set_num_threads(1)
    try:
        with cluster.local_cluster(plan):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_local_cluster_is_threads_of_this_process():
    plan = cluster.ClusterPlan(n_workers=2, threads_per_worker=1, torch_threads=1)
    with cluster._start_local_cluster(plan) as local:
        assert {type(w) for w in local.workers.values()} == {distributed.Worker}
        assert len(local.workers) == 2
        assert local.dashboard_link, "a dashboard on a free port"
        # each would measure the whole process against its share of the RAM, pause, and hang
        assert [w.memory_manager.memory_limit for w in local.workers.values()] == [None, None]


def test_a_kept_local_cluster_that_lost_its_workers_is_started_again():
    """No nanny brings an in-process worker back: later runs' tasks waited for ever. The
    cluster it replaces is closed, not left running beside it."""
    plan = cluster.ClusterPlan(n_workers=1, threads_per_worker=1, torch_threads=1)
    first = cluster._shared_local_client(plan)
    try:
        assert cluster._shared_local_client(plan) is first, "kept while it works"
        local, _ = cluster._LOCAL[plan]
        first.retire_workers(close_workers=True)
        deadline = time.monotonic() + 30
        while local.scheduler.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not local.scheduler.workers
        again = cluster._shared_local_client(plan)
        assert again is not first
        assert first.status == "closed", "the old client left open"
        assert local.status.name == "closed", "the old cluster left running"
        assert again.submit(lambda: 41 + 1).result(timeout=30) == 42
    finally:
        cluster._close_local(plan)


def test_a_kept_process_cluster_short_of_workers_is_kept(monkeypatch):
    """A GPU plan's workers are processes whose nanny restarts them (and without dask-cuda
    one worker stands for all the GPUs): a run finding fewer than planned closed the cluster
    under the runs still on it."""
    import types

    plan = cluster.ClusterPlan(2, threads_per_worker=1, torch_threads=1, gpus=2, processes=True)
    kept = types.SimpleNamespace(status="running")
    local = types.SimpleNamespace(scheduler=types.SimpleNamespace(workers={}))
    monkeypatch.setitem(cluster._LOCAL, plan, (local, kept))
    assert cluster._shared_local_client(plan) is kept


def test_a_small_image_takes_the_gpu_cluster_already_started_not_this_process(monkeypatch):
    """In this process is cheaper only while a GPU plan's worker processes are not started:
    once a run started them, a small image runs there too, not on a CUDA context of the
    driver's beside them (its model loaded a second time, the GPU's memory shared)."""
    plan = cluster.ClusterPlan(2, threads_per_worker=2, torch_threads=4, gpus=2, processes=True)
    small = 512 * 512
    assert cluster.in_process_is_cheaper(plan, small), "none started: in this process"
    # 4 processes' start took 8.3 s on an H200, this process's time for about 270 Mpx
    assert cluster.in_process_is_cheaper(plan, 8192 * 8192)
    assert not cluster.in_process_is_cheaper(plan, 16384 * 16384), "worth their start"
    monkeypatch.setitem(cluster._LOCAL, plan, (object(), object()))  # started by a run
    assert not cluster.in_process_is_cheaper(plan, small)


def test_a_worker_that_died_is_left_out_of_the_question_of_amp_and_another_error_named(
    monkeypatch,
):
    """client.run raised a dead worker's CommClosedError, naming nothing, at a run's start;
    a worker's own error (segpipe not installed there) must still be said, not taken for
    "no workers yet"."""
    from distributed.comm.core import CommClosedError

    class Workers:
        def __init__(self, answers):
            self.answers = answers

        def run(self, function, on_error="raise"):
            assert on_error == "return"
            return self.answers

        def wait_for_workers(self, n, timeout):  # the dead one is still the scheduler's
            self.waits = getattr(self, "waits", 0) + 1

    monkeypatch.setattr(workers, "WORKERS_WAIT_S", 1.5)
    gone = CommClosedError("in <TCP (closed)>: ConnectionResetError")
    assert resolve_amp(None, "auto", Workers({"tcp://a": False, "tcp://b": gone})) is False
    # Asked again for WORKERS_WAIT_S (a worker restarting), about once a second
    with pytest.raises(ValueError, match=r"GPU \(none of its 1 workers answered for 1\.5 s\)"):
        resolve_amp(None, "auto", only_dead := Workers({"tcp://b": gone}))
    assert only_dead.waits == 2
    # The nanny's new worker answers at the second asking: that answer is taken
    restarting = Workers({"tcp://b": gone})
    restarting.wait_for_workers = lambda n, timeout: setattr(
        restarting, "answers", {"tcp://c": False}
    )
    assert resolve_amp(None, "auto", restarting) is False
    missing = ImportError("No module named 'segpipe'")
    with pytest.raises(RuntimeError, match=r"worker tcp://b could not say .*No module named"):
        resolve_amp(None, "auto", Workers({"tcp://a": False, "tcp://b": missing}))


@pytest.mark.parametrize("n_workers", [1, 2])
def test_local_cluster_runs_fewer_diagnostics(n_workers):
    """Dask's profiler and monitors wake the event loop beside the model thread: the local
    clusters runs start leave the profiler off and the system monitor slower, and steal
    work only between workers; Dask's own settings are left as they were."""
    before = dask.config.get("distributed.worker.profile.enabled")
    plan = cluster.ClusterPlan(n_workers=n_workers, threads_per_worker=1, torch_threads=1)
    with cluster._start_local_cluster(plan) as local:
        for worker in local.workers.values():
            assert "profile" not in worker.periodic_callbacks
            assert "profile-cycle" not in worker.periodic_callbacks
            assert worker.periodic_callbacks["monitor"].callback_time == 2000
            assert worker.periodic_callbacks["tick"].callback_time == 20, "kept"
            assert "memory_monitor" not in worker.periodic_callbacks, "no limit to watch"
        assert ("stealing" in local.scheduler.extensions) == (n_workers > 1)
    assert dask.config.get("distributed.worker.profile.enabled") == before
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as plain:
        worker = next(iter(plain.workers.values()))
        assert "profile" in worker.periodic_callbacks, "Dask's default, for contrast"


def test_gpus_without_dask_cuda_get_one_worker_not_all_on_the_first(monkeypatch, caplog):
    """Plain workers are not told their GPU apart: N of them all ran on cuda:0, each budgeting
    its memory as if alone. Without dask-cuda one worker runs, with the cores of all the
    worker processes there would have been, and the log says why."""
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails
    monkeypatch.setattr(plans, "_dask_cuda_installed", lambda: False)
    started = {}
    monkeypatch.setattr(distributed, "LocalCluster", lambda **kw: started.update(kw))
    plan = cluster.plan_local_cluster(torch.device("cuda"), cpus=8, gpus=2)
    assert plan == cluster.ClusterPlan(1, 7, 8, gpus=2, processes=False)
    with caplog.at_level("WARNING", logger=cluster.__name__):
        cluster._new_local_cluster(plan)
    assert started["n_workers"] == 1 and started["processes"] is False
    assert started["resources"] == {"GPU": 1}
    assert "one worker, on the first of 2 GPUs" in caplog.text


def test_gpus_with_dask_cuda_get_a_worker_process_each(monkeypatch, caplog):
    """dask-cuda tells each of its worker processes its GPU: one per GPU, sharing the cores."""
    started = {}
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kw: started.update(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(plans, "_dask_cuda_installed", lambda: True)
    monkeypatch.setattr(plans, "main_reimport_is_safe", lambda: True)
    plan = cluster.plan_local_cluster(torch.device("cuda"), cpus=16, gpus=2)
    assert plan == cluster.ClusterPlan(2, 7, 8, gpus=2, processes=True)
    with caplog.at_level("WARNING", logger=cluster.__name__):
        cluster._new_local_cluster(plan)
    assert started["threads_per_worker"] == 7 and started["resources"] == {"GPU": 1}
    assert started["n_workers"] == 2
    assert "dask-cuda is not installed" not in caplog.text
    started.clear()
    cluster._new_local_cluster(cluster.plan_local_cluster(torch.device("cuda"), cpus=16, gpus=4,
                                                          n_workers=3))  # fmt: skip
    assert started["n_workers"] == 3, "the first 3 GPUs, as asked"


@pytest.mark.parametrize("dask_cuda", [True, False])
def test_one_gpu_is_shared_by_plain_worker_processes(dask_cuda, monkeypatch):
    """One process's GIL held an H200 host's pipeline to 43 Mpx/s: one GPU is shared by a
    plain LocalCluster's worker processes (dask-cuda's would give each a GPU of its own), each
    told how many share it (its memory budget's part), whether dask-cuda is there or not."""
    started = {}
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kw: pytest.fail("dask-cuda's cluster for one GPU")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(plans, "_dask_cuda_installed", lambda: dask_cuda)
    monkeypatch.setattr(plans, "main_reimport_is_safe", lambda: True)
    monkeypatch.setattr(distributed, "LocalCluster", lambda **kw: started.update(kw))
    plan = cluster.plan_local_cluster(torch.device("cuda"), cpus=16, gpus=1)
    assert plan == cluster.ClusterPlan(4, 3, 4, gpus=1, processes=True)
    cluster._new_local_cluster(plan)
    assert started["n_workers"] == 4 and started["processes"] is True
    assert started["threads_per_worker"] == 3 and started["resources"] == {"GPU": 1}
    assert started["env"] == {SHARING_ENV: "4"}


@pytest.mark.integration
def test_a_shared_gpus_workers_are_processes_told_how_many_share_it(monkeypatch):
    """The processes really start (spawned: each its own GIL), each knows the share, each
    starts with malloc keeping freed memory, and this process's environment is left alone."""
    plan = cluster.ClusterPlan(n_workers=2, threads_per_worker=1, torch_threads=1, gpus=1,
                               processes=True)  # fmt: skip
    # conftest sets glibc's default as if by hand, which a user's tuning leaves alone
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    expected = allocator.malloc_environ()  # before: Dask's nannies write to this process's
    assert expected or not allocator._tunable(), "glibc: the workers get its settings"
    names = {*expected, "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    here = {name: os.environ.get(name) for name in names}
    with cluster._start_local_cluster(plan) as local, distributed.Client(local) as client:
        # This process's own environment as it was: the caller's later children inherit it.
        assert {name: os.environ.get(name) for name in names} == here
        client.wait_for_workers(2, timeout=120)
        pids = client.run(os.getpid)
        shares = client.run(lambda: os.environ.get(SHARING_ENV))
        resources = {w.resources.get("GPU") for w in local.scheduler.workers.values()}
        # A nanny whose worker died starts another, writing its environment here again.
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len(set(client.run(os.getpid, on_error="ignore").values()) - set(pids.values())) != 1:
            assert time.monotonic() < deadline, "the nanny did not restart its worker"
            time.sleep(0.2)
        assert {name: os.environ.get(name) for name in names} == here, "after a restart"
        malloc = client.run(lambda: {k: v for k, v in os.environ.items() if "MALLOC" in k})
        threads = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert set(shares.values()) == {"2"} and resources == {1}
    assert SHARING_ENV not in os.environ, "told to the workers, not set here"
    # malloc keeps freed memory from the workers' start (not the nanny's 64 KiB trim
    # threshold: 1.6-1.8 s against 0.96-1.09 s a run), Dask's other settings as they were
    if expected:
        assert list(malloc.values()) == [expected, expected]
    assert set(threads.values()) == {"1"}
    assert allocator.malloc_environ() == expected, "this process's malloc is no user's tuning"


def test_the_environment_is_put_back_when_the_last_of_overlapping_starts_ends(monkeypatch):
    """Nannies start workers side by side: the first to finish must not take the environment
    from one whose worker has not spawned yet; the last puts back what was there before."""
    monkeypatch.setenv("SEGPIPE_TEST_KEPT", "mine")
    monkeypatch.delenv("SEGPIPE_TEST_NEW", raising=False)
    names = ["SEGPIPE_TEST_KEPT", "SEGPIPE_TEST_NEW"]
    first, second = nannies.environ_kept(names), nannies.environ_kept(names[1:])
    first.__enter__()
    os.environ.update(SEGPIPE_TEST_KEPT="nanny", SEGPIPE_TEST_NEW="nanny")
    second.__enter__()
    first.__exit__(None, None, None)
    assert os.environ["SEGPIPE_TEST_NEW"] == "nanny", "the second nanny's worker may spawn yet"
    second.__exit__(None, None, None)
    assert os.environ["SEGPIPE_TEST_KEPT"] == "mine" and "SEGPIPE_TEST_NEW" not in os.environ


def test_only_worker_processes_start_with_malloc_tuned():
    """Threads of this process share its malloc (keep_freed_memory's); processes get the
    environment, the nanny's other pre-spawn settings kept."""
    threads = cluster.local_cluster_config(cluster.ClusterPlan(1, 2, 2, gpus=1))
    assert "distributed.nanny.pre-spawn-environ" not in threads
    processes = cluster.ClusterPlan(2, 2, 2, gpus=1, processes=True)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"OMP_NUM_THREADS": 1}}):
        spawn = cluster.local_cluster_config(processes)["distributed.nanny.pre-spawn-environ"]
    assert spawn == {"OMP_NUM_THREADS": 1, **allocator.malloc_environ()}


@pytest.mark.parametrize("tuned", [{"MALLOC_TRIM_THRESHOLD_": 0}, {"MALLOC_ARENA_MAX": 4}])
def test_a_users_malloc_in_dasks_pre_spawn_environment_is_kept(tuned, monkeypatch):
    """Dask's docs have users tune the workers' malloc in its pre-spawn environment: theirs
    goes to the workers as it is, none of segpipe's beside it. Dask's own 64 KiB trim
    threshold is no user's: segpipe's settings replace it."""
    monkeypatch.setattr(allocator, "_tunable", lambda: True)  # glibc, nothing tuned here
    key = "distributed.nanny.pre-spawn-environ"
    processes = cluster.ClusterPlan(2, 2, 2, gpus=1, processes=True)
    with dask.config.set({key: {"OMP_NUM_THREADS": 1, **tuned}}):
        spawn = cluster.local_cluster_config(processes)[key]
    assert spawn == {"OMP_NUM_THREADS": 1, **tuned}
    with dask.config.set({f"{key}.MALLOC_TRIM_THRESHOLD_": 65536}):  # Dask's default
        spawn = cluster.local_cluster_config(processes)[key]
    assert spawn["MALLOC_TRIM_THRESHOLD_"] == allocator.malloc_environ()["MALLOC_TRIM_THRESHOLD_"]
    assert spawn["MALLOC_ARENA_MAX"] == "1"


def test_one_gpus_local_cluster_of_one_worker_is_threads_of_this_process(monkeypatch):
    """Where one GPU is not shared (too few cores, one worker asked, a script without a main
    guard), its worker is threads of this process, as the CPU's: a process would only add
    its start (7.7 s on an H200) and the driver's traffic with it. Its tasks take the GPU
    resource it declares, and a small image takes it as readily as this process."""
    plan = cluster.ClusterPlan(n_workers=1, threads_per_worker=2, torch_threads=2, gpus=1)
    main = sys.modules["__main__"]
    with cluster._start_local_cluster(plan) as local, distributed.Client(local) as client:
        assert not local.processes
        (worker,) = local.workers.values()
        assert worker.state.nthreads == 2
        assert worker.state.total_resources == {"GPU": 1}
        pids = client.run(os.getpid)
        assert set(pids.values()) == {os.getpid()}
    assert sys.modules["__main__"] is main
    assert not cluster.in_process_is_cheaper(plan, 512 * 512), "threads start in no time"


@pytest.mark.integration
def test_a_forked_child_starts_its_own_local_cluster(image_path, checkpoints, tmp_path):
    """After a run on the default local cluster, a child forked by multiprocessing inherited
    its client and dask's threaded pool but not the threads that run them, and its own run
    waited forever."""
    script = tmp_path / "fork.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing
            import segpipe

            def run(name):  # a tissue mask computes on dask's threaded pool
                segpipe.segment({str(image_path)!r}, {str(tmp_path)!r} + "/" + name,
                                {str(checkpoints[0])!r}, tile=16, foreground="tissue")

            if __name__ == "__main__":
                run("parent.zarr")
                child = multiprocessing.get_context("fork").Process(target=run, args=("c.zarr",))
                child.start()
                child.join(120)
                print("child exit", child.exitcode)
                if child.is_alive():
                    child.kill()
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "child exit 0" in done.stdout, done.stderr[-3000:]
    assert is_complete(tmp_path / "parent.zarr") and is_complete(tmp_path / "c.zarr")


@pytest.mark.integration
def test_plain_script_without_main_guard(image_path, checkpoints, tmp_path):
    """The default scheduler from a script with no ``if __name__ == "__main__":`` guard: worker
    processes would re-import it; threads do not. Torch threads are process-wide: each task
    runs with the plan's share of the cores, and the script gets its own setting back."""
    script = tmp_path / "plain.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import logging
            import torch
            import segpipe
            from segpipe.execution import tasks

            logging.basicConfig(level=logging.INFO)
            in_tasks = []
            stage_for = tasks.stage_for
            def spy(key):
                in_tasks.append(torch.get_num_threads())
                return stage_for(key)
            tasks.stage_for = spy
            before = torch.get_num_threads()
            segpipe.segment({str(image_path)!r}, {str(tmp_path / "r.zarr")!r},
                            {str(checkpoints[0])!r}, tile=16)
            print("task threads", sorted(set(in_tasks)))
            print("script threads kept", torch.get_num_threads() == before)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_complete(tmp_path / "r.zarr")
    assert "dashboard:" in done.stderr
    assert "already in use" not in done.stderr
    plan = cluster.plan_local_cluster(torch.device("cpu"))
    assert f"task threads [{plan.torch_threads}]" in done.stdout
    assert "script threads kept True" in done.stdout


def test_cuda_on_a_machine_without_one_fails_on_the_local_workers(
    image_path, checkpoints, tmp_path, no_config_address
):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match=r"worker .*sees no CUDA GPU; run on workers that have"):
        segpipe.segment(image_path, tmp_path / "r.zarr", checkpoints[0], device="cuda", **SETTINGS)


def test_a_client_whose_scheduler_died_is_refused_naming_it(
    image_path, checkpoints, no_config_address, tmp_path
):
    """The active client of a killed scheduler stays the default, reconnecting: a run on it
    failed after Dask's 30 s connect timeout with a bare comm error, the flows after ingest."""
    from segpipe.execution.schedulers import reachable_scheduler

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--no-dashboard"]
    scheduler = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL
    )
    client = None
    try:
        client = distributed.Client(f"tcp://127.0.0.1:{port}", timeout="60s")
        scheduler.kill()
        scheduler.wait()
        deadline = time.monotonic() + 30
        while client.status == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.status == "connecting"
        assert choose_scheduler() is client, "still the process's default client"
        with pytest.raises(ConnectionError, match=f"status 'connecting'.*127.0.0.1:{port}"):
            reachable_scheduler()
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
            segpipe.segment(image_path, tmp_path / "r.zarr", checkpoints[0], **SETTINGS)
        assert not is_complete(tmp_path / "r.zarr")
    finally:
        scheduler.kill()
        if client is not None:
            client.close(timeout=5)
    with pytest.raises(ConnectionError, match=f"the Dask client {client.id} was closed"):
        reachable_scheduler(client)


@pytest.mark.integration
def test_a_scheduler_killed_mid_run_is_named_and_the_run_resumes(image_path, checkpoints, tmp_path):
    """Dask's "ConnectionPool.gather: Stream is closed" named neither the scheduler nor the
    result, 30 s after the kill (the clean-up waited on the dead scheduler)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    module = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--no-dashboard"]
    scheduler = subprocess.Popen(
        [*module, "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL
    )
    module = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-dashboard"]
    worker = subprocess.Popen(
        [*module, "--nthreads", "1", "--memory-limit", "0"],
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its nanny and worker killed together
    )
    out = tmp_path / "r.zarr"

    def kill_the_scheduler(done: int, total: int) -> None:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()

    try:
        with distributed.Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=120)
            lost = f"lost the Dask scheduler {address} while segmenting {out} .*run again"
            with pytest.raises(ConnectionError, match=lost):
                segpipe.segment(
                    image_path,
                    out,
                    checkpoints[0],
                    scheduler=client,
                    on_progress=kill_the_scheduler,
                    **SETTINGS,
                )
    finally:
        scheduler.kill()
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert not is_complete(out)
    segpipe.segment(image_path, out, checkpoints[0], scheduler="sync", **SETTINGS)
    clean = segpipe.segment(
        image_path, tmp_path / "clean.zarr", checkpoints[0], scheduler="sync", **SETTINGS
    )
    for name, values in stored(out).items():
        np.testing.assert_array_equal(values, stored(clean)[name])


def test_a_run_waiting_on_a_scheduler_without_workers_says_so_once(monkeypatch, caplog):
    """Workers all gone (killed, scaled to 0): the run waited for ever, without a word."""
    import types

    from segpipe.execution import schedulers

    monkeypatch.setattr(schedulers, "NO_WORKERS_WARNING_S", 0.24)  # polled every 0.02 s
    workers: dict[str, int] = {"tcp://127.0.0.1:2": 1}
    polls = []

    def nthreads() -> dict[str, int]:
        polls.append(len(workers))
        return dict(workers)

    def until(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    client = types.SimpleNamespace(
        nthreads=nthreads, scheduler=types.SimpleNamespace(address="tcp://127.0.0.1:1")
    )
    with caplog.at_level("WARNING", logger="segpipe.execution.schedulers"):
        with schedulers.workers_watched(client, "r.zarr"):  # type: ignore[arg-type]
            until(lambda: len(polls) >= 20)  # workers all the while: nothing said
            assert not caplog.records
            workers.clear()
            until(lambda: caplog.records)  # none for 0.24 s: said
            seen = len(polls)
            until(lambda: len(polls) >= seen + 20)
            assert len(caplog.records) == 1  # once
            workers["tcp://127.0.0.1:3"] = 1
            until(lambda: polls[-1] == 1)
            workers.clear()
            until(lambda: len(caplog.records) == 2)  # gone again: said again
        stopped = len(polls)
        time.sleep(0.2)
    assert len(polls) <= stopped + 1  # the watch ends with the run
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(
            "r.zarr: the Dask scheduler tcp://127.0.0.1:1 has had no worker for 0 s; the run waits"
        )
    )


def test_a_kept_local_cluster_whose_client_closed_is_closed_and_started_again():
    """A kept client no longer running is not handed to a run (its futures would never
    come back); the cluster behind it is closed, not left running beside its successor."""
    plan = cluster.ClusterPlan(n_workers=1, threads_per_worker=1, torch_threads=1)
    first = cluster._shared_local_client(plan)
    try:
        local, _ = cluster._LOCAL[plan]
        first.close()
        again = cluster._shared_local_client(plan)
        assert again is not first
        assert again.status == "running"
        assert again.submit(lambda: 41 + 1).result(timeout=30) == 42
        assert local.status.name == "closed", "the first cluster left running"
    finally:
        if plan in cluster._LOCAL:
            cluster._close_local(plan)


def test_a_child_forked_from_a_forked_child_runs_in_itself_too(no_config_address):
    """A process forked from one that ran a local cluster runs its tasks in itself; so does
    its own child, whose parent started none (its _LOCAL empty) but still holds the clients
    and pools inherited from the first, without their threads. _forget_in_child is what
    os.register_at_fork runs in each child."""
    monkeypatch = no_config_address
    plan = cluster.ClusterPlan(n_workers=1, threads_per_worker=1, torch_threads=1)
    # The module's state as a parent that ran a local cluster left it, restored after.
    monkeypatch.setattr(cluster, "_LOCAL", {plan: (object(), object())})
    monkeypatch.setattr(cluster, "_FORKED", False)
    monkeypatch.setattr(cluster, "_LOCAL_LOCK", cluster._LOCAL_LOCK)
    monkeypatch.setattr(dask.threaded, "default_pool", dask.threaded.default_pool)
    monkeypatch.setattr(dask.threaded, "pools_lock", dask.threaded.pools_lock)
    monkeypatch.setattr(dask.threaded, "pools", {})
    monkeypatch.setattr(cluster, "_start_local_cluster", _no_local_cluster)
    for generation in ("child", "grandchild"):
        cluster._forget_in_child()
        assert cluster._FORKED, generation
        assert cluster._LOCAL == {}, generation
        with cluster.connect(None, plan) as client:
            assert client is None, f"the {generation} would start a local cluster"


def _no_local_cluster(plan):
    raise AssertionError("a local cluster was started")


def test_a_block_whose_workers_died_says_how_many_and_the_last(
    image_path, checkpoints, threaded_client, monkeypatch, tmp_path
):
    """KilledWorker's allowed_failures is the deaths Dask allowed before giving up: the block
    ran on one worker more than that, each died; the message counts them and names the
    last, then says the run resumes."""
    last = types.SimpleNamespace(address="tcp://10.0.0.9:4321")

    def killed(block, job):  # what the task's future raises once its workers all died
        raise distributed.KilledWorker(f"segpipe-block-{block.key}", last, 2)

    monkeypatch.setattr(cluster, "segment_block", killed)
    out = tmp_path / "r.zarr"
    with pytest.raises(WorkersDiedError) as caught:
        segpipe.segment(image_path, out, checkpoints[0], scheduler=threaded_client, **SETTINGS)
    assert isinstance(caught.value.__cause__, distributed.KilledWorker)
    message = str(caught.value)
    assert message.startswith(f"{out}: every Dask worker that ran one of its blocks died ")
    assert "(3 of them, the last tcp://10.0.0.9:4321)" in message
    assert "run again to resume" in message


@pytest.mark.parametrize("io_threads", [1, 3, None])
def test_run_blocks_in_this_process_runs_the_io_threads_asked(monkeypatch, io_threads):
    """``io_threads`` blocks at a time, as asked; by default the local plan's I/O threads."""
    seen = []
    plugin = types.SimpleNamespace(setup=lambda: None, teardown=lambda: None)
    monkeypatch.setattr(cluster, "ModelPlugin", lambda *args, **kwargs: plugin)
    monkeypatch.setattr(
        cluster, "run_in_process", lambda work, blocks, on_result, threads: seen.append(threads)
    )
    cluster.run_blocks(
        [],
        types.SimpleNamespace(predictor_key="k" * 16),
        client=None,
        model="unused.pt",
        config=InferenceConfig(device="cpu"),
        on_result=lambda result: None,
        io_threads=io_threads,
    )
    assert seen == [io_threads or cluster.plan_for_device("cpu").threads_per_worker]
