"""Where tasks run: local clusters laid out for the machine, connections to running ones, and
the loop that runs a result's blocks and reports each one."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dask
import dask.threaded
import distributed
import distributed.comm.core
import torch
import tornado.iostream

from segpipe.execution import schedulers
from segpipe.execution.allocator import malloc_environ
from segpipe.execution.inprocess import run_in_process
from segpipe.execution.lending import model_given_back
from segpipe.execution.nannies import Nanny, environ_kept
from segpipe.execution.plans import ClusterPlan, plan_for_device, plan_local_cluster
from segpipe.execution.predictor import SHARING_ENV, InferenceConfig, resolve_device
from segpipe.execution.schedulers import choose_scheduler, live_client, reachable_scheduler
from segpipe.execution.tasks import Block, BlockResult, Job, segment_block
from segpipe.execution.workers import ModelPlugin, orphaned_plugins

__all__ = [
    "ClusterPlan",
    "choose_scheduler",
    "close_local_clusters",
    "connect",
    "in_process_is_cheaper",
    "local_cluster",
    "local_cluster_config",
    "plan_for_device",
    "plan_local_cluster",
    "reachable_scheduler",
    "run_blocks",
]

log = logging.getLogger(__name__)


def local_cluster_config(plan: ClusterPlan) -> dict[str, Any]:
    """Dask settings for the local clusters runs start: no statistical profiler, the system
    monitor every 2 s, no stealing with one worker. Each wake of the event loop takes the GIL
    (a GPU's model thread launches kernels with it) and a core (the CPU's torch team waits);
    the memory monitor (0.1 s) and the tick (20 ms: its 3 s limit counts it in) are kept.
    Worker processes start with malloc keeping freed memory (``malloc_environ``), not with
    the nanny's 64 KiB trim threshold, unless the user's Dask config tunes malloc there."""
    config: dict[str, Any] = {
        "distributed.worker.profile.enabled": False,
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.scheduler.work-stealing": plan.n_workers > 1,
    }
    if plan.processes:
        spawn_env = dask.config.get(_SPAWN_ENV, {})
        dasks = dask.config.get(_SPAWN_ENV, {}, config=dask.config.merge(*dask.config.defaults))
        users = [name for name, value in spawn_env.items() if dasks.get(name) != value]
        config[_SPAWN_ENV] = {**spawn_env, **malloc_environ(tuned=users)}
    return config


_SPAWN_ENV = "distributed.nanny.pre-spawn-environ"


# dask.config.set changes the process's config until its block ends: clusters started by two
# threads at once must not interleave their settings and restores.
_CONFIG_LOCK = threading.Lock()


def _start_local_cluster(plan: ClusterPlan) -> Any:
    # Read as the scheduler, workers and nannies start (a nanny hands it to its worker). Each
    # item is made once the one before is entered: the config set under the lock, then kept.
    with (
        _CONFIG_LOCK,
        dask.config.set(local_cluster_config(plan)),
        environ_kept(dask.config.get(_SPAWN_ENV, {})),
    ):
        return _new_local_cluster(plan)


def _new_local_cluster(plan: ClusterPlan) -> Any:
    # ":0": a free port, so runs side by side never fight over 8787.
    if plan.processes and plan.gpus > 1:
        from dask_cuda import LocalCUDACluster  # a process per GPU, each owning its device

        return LocalCUDACluster(
            n_workers=plan.n_workers,  # the first GPUs
            threads_per_worker=plan.threads_per_worker,
            resources=plan.resources,
            dashboard_address=":0",
        )
    if plan.processes:  # one GPU, shared: each worker budgets its part of the free memory
        return distributed.LocalCluster(
            n_workers=plan.n_workers,
            threads_per_worker=plan.threads_per_worker,
            processes=True,
            resources=plan.resources,
            env={SHARING_ENV: str(plan.n_workers)},
            worker_class=Nanny,
            dashboard_address=":0",
        )
    if plan.gpus > 1:
        # Plain workers are not told their GPU apart: all would share the first one.
        log.warning("dask-cuda is not installed: one worker, on the first of %d GPUs "
                    "(pip install dask-cuda for one on each)", plan.gpus)  # fmt: skip
    # Threads of this process: worker processes (spawn/forkserver) re-import the caller's
    # __main__, which breaks a plain script without a main guard; torch releases the GIL in
    # its kernels. No memory limit: each worker would measure the whole process against its
    # share of the RAM and pause at 80%, and the run hang (no nanny restarts it).
    return distributed.LocalCluster(
        n_workers=plan.n_workers,
        threads_per_worker=plan.threads_per_worker,
        processes=False,
        memory_limit=0,
        resources=plan.resources,
        dashboard_address=":0",
    )


@contextlib.contextmanager
def local_cluster(plan: ClusterPlan) -> Iterator[str]:
    """A local cluster laid out by ``plan``, its workers up, yielding the scheduler's address;
    closed on exit. Many runs can share it by address (``SegmentConfig(scheduler=address)``),
    e.g. the images of one archive run, instead of each starting one sized to the machine.
    """
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(_start_local_cluster(plan))
        with distributed.Client(cluster, set_as_default=False) as client:
            # A run asks the workers whether they have a GPU (resolve_amp): they must be up.
            client.wait_for_workers(len(cluster.workers), timeout="60s")
            log.info("local Dask cluster started; dashboard: %s", client.dashboard_link)
        if not plan.gpus:
            # Threads of this process, and a run connected by address leaves torch's threads
            # alone: the workers' share of the cores here (process-wide), the caller's at exit.
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(plan.torch_threads)
        yield str(cluster.scheduler_address)


@contextlib.contextmanager
def connect(scheduler: Any, plan: ClusterPlan) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, or None to run tasks in this process.

    The scheduler is chosen by :func:`choose_scheduler`: an explicit ``scheduler``
    (``"sync"`` runs every task here, through the same pipeline: debugging, tiny images; an
    address like ``tcp://host:8786`` connects to a running scheduler; a ``Client`` is used as
    it is), else this process's active client, else Dask's ``scheduler-address`` config
    (``DASK_SCHEDULER_ADDRESS``), else a LocalCluster laid out by ``plan``, started once and
    kept for the process's later runs (:func:`close_local_clusters`; closed at exit); None in
    a process forked from one that ran a local cluster (Dask is not fork-safe).
    """
    scheduler = choose_scheduler(scheduler)
    if scheduler == "sync":
        yield None
    elif isinstance(scheduler, distributed.Client):
        yield live_client(scheduler)
    elif scheduler is None:
        yield None if _FORKED else _shared_local_client(plan)
    elif isinstance(scheduler, str):
        # Not the process's default client: runs in threads side by side (an archive's
        # images) would each set and reset Dask's global scheduler under another's compute.
        with distributed.Client(
            scheduler, timeout=schedulers.CONNECT_TIMEOUT, set_as_default=False
        ) as client:
            log.info("connected to %s; dashboard: %s", scheduler, client.dashboard_link)
            yield client
    else:
        raise TypeError(
            f"scheduler must be None, 'sync', an address like 'tcp://host:8786' or a "
            f"distributed.Client; got {scheduler!r}"
        )


# Local clusters of runs with no scheduler, one per layout, kept for the process's later runs.
_LOCAL: dict[ClusterPlan, tuple[Any, Any]] = {}
_LOCAL_LOCK = threading.Lock()
_FORKED = False  # this process was forked from one that ran a local cluster


def _shared_local_client(plan: ClusterPlan) -> Any:
    with _LOCAL_LOCK:
        if plan in _LOCAL:
            cluster, client = _LOCAL[plan]
            # threads with none left (an error, a ttl) have no nanny: later runs would hang
            if client.status == "running" and (plan.processes or cluster.scheduler.workers):
                return client
            log.info("the kept local Dask cluster lost its workers; starting another")
            _close_local(plan)
        cluster = _start_local_cluster(plan)
        client = distributed.Client(cluster, set_as_default=False)
        log.info("local Dask cluster started; dashboard: %s", client.dashboard_link)
        _LOCAL[plan] = (cluster, client)
        return client


def _close_local(plan: ClusterPlan) -> None:
    cluster, client = _LOCAL.pop(plan)
    with contextlib.suppress(Exception):  # at exit the loop may be gone already
        client.close()
        cluster.close()


def _forget_in_child() -> None:
    # A forked child (multiprocessing's default on Linux) inherits clients and Dask's pools
    # but not their threads: it waited forever. It runs tasks in itself, on pools made anew.
    global _LOCAL_LOCK, _FORKED
    _LOCAL_LOCK, _FORKED = threading.Lock(), _FORKED or bool(_LOCAL)
    _LOCAL.clear()
    dask.threaded.default_pool, dask.threaded.pools_lock = None, threading.Lock()
    dask.threaded.pools.clear()  # the threaded scheduler's (a tissue mask computes on it)


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _close_at_exit() -> None:
    # Handlers (pytest's, Prefect's) may have closed their streams: no tracebacks about it.
    if _LOCAL:
        logging.raiseExceptions = False
        close_local_clusters()


def close_local_clusters() -> None:
    """Close the local clusters runs of this process started (done at exit anyway)."""
    with _LOCAL_LOCK:
        for plan in list(_LOCAL):
            _close_local(plan)


# Work (px) too small to start worker processes for: on an H200, starting 4 that share the GPU
# cost a first call 8.3 s over a reused cluster (10.5 s against 2.2 s at 8192²), the time this
# process took for about 270 Mpx (sync, 34 Mpx/s).
IN_PROCESS_BELOW_PX = 16384 * 16384


def in_process_is_cheaper(plan: ClusterPlan, pixels: int) -> bool:
    """Whether a run with no scheduler should run in this process rather than start the local
    cluster ``plan`` lays out: when its worker processes (GPUs) are not started yet and the
    image is small (their start-up, seconds, would outweigh the work); threads cost little.

    >>> in_process_is_cheaper(ClusterPlan(2, 4, 8, gpus=2, processes=True), 8192 * 8192)
    True
    >>> in_process_is_cheaper(ClusterPlan(1, 4, 8, gpus=1), 2048 * 2048)
    False
    """
    return plan.processes and plan not in _LOCAL and pixels < IN_PROCESS_BELOW_PX


def run_blocks(
    blocks: list[Block],
    job: Job,
    *,
    client: Any,
    model: str | torch.nn.Module,
    config: InferenceConfig,
    on_result: Callable[[BlockResult], None],
    io_threads: int | None = None,
) -> None:
    """Run every block, calling ``on_result`` in the driver as each one finishes.

    ``client`` None runs them in this process, ``io_threads`` blocks at a time (default: the
    local plan's I/O threads), in order of submission.

    A failing task cancels the rest and raises; blocks finished before it have been reported,
    so a re-run resumes from them. The caller's ``model`` is left as it is: workers' predictors
    put their pickled copy in eval mode, on their device, channels-last; this process's
    predictor puts the module itself so, and it is given back as it was when the run ends.
    """
    if client is None:
        # In this process: blocks in I/O threads feeding one model thread, as on a worker. A
        # module is the caller's (segmenting mid-training must not leave it in eval mode).
        plugin = ModelPlugin(job.predictor_key, model, config)
        threads = io_threads or plan_for_device(config.device, processes=False).threads_per_worker
        with contextlib.ExitStack() as lent:
            if isinstance(model, torch.nn.Module):
                # A device this process lacks is refused by the plugin's setup, saying where.
                auto = config.device == "auto"
                dev = resolve_device() if auto else torch.device(config.device)
                lent.enter_context(model_given_back(model, dev))
            plugin.setup()
            lent.callback(plugin.teardown)  # the model thread stopped before it is given back
            run_in_process(lambda b: segment_block(b, job), blocks, on_result, threads=threads)
        return
    plugin = ModelPlugin(job.predictor_key, model, config, owner=client.id)

    # Registered for this run only, by its name: a shared cluster's workers get their memory
    # back; other runs' plugins are left alone, but for killed drivers', which nothing else
    # would unregister (their models, tiles and files held, loaded by every joining worker).
    try:
        orphans = client.run_on_scheduler(orphaned_plugins)
    except Exception as err:  # a scheduler without segpipe installed: nothing to sweep by
        log.debug("could not look for orphaned segpipe plugins: %s", err)
        orphans = []
    for name in orphans:
        log.warning("dropping %s: the run that registered it has no client any more", name)
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)
    try:
        _register(client, plugin, job.output)
    except BaseException:
        # A worker refused (no CUDA there): workers that join later must not load it. The
        # worker's error is the one to report, not a failure of this clean-up.
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin.name)
        raise
    pending: dict[str, Any] = {}
    try:  # from here on the plugin is unregistered whatever fails (client.map pickles here)
        keys = [f"segpipe-block-{job.predictor_key}-{b.key}" for b in blocks]
        # No task resources (GPU=1 ran one block at a time, I/O threads idle): a worker takes
        # a block per thread, all feeding its one model thread, and decides its own device.
        futures = client.map(segment_block, blocks, job=job, pure=False, key=keys)
        pending = {f.key: f for f in futures}
        completed = distributed.as_completed(futures, loop=client.loop)
        del futures
        with _thread_given_back(), schedulers.workers_watched(client, job.output):
            for fut in completed:
                result = fut.result()
                # Let go of at once: the scheduler keeps a result while a future refers to
                # it, and recomputes it if its worker dies, a block already recorded.
                del pending[fut.key]
                fut.release()
                on_result(result)
    except distributed.KilledWorker as err:
        # Dask's message named neither the result nor that a re-run resumes; a traceback
        # (a bug's) for what is the machine's doing: a worker killed, mostly for memory.
        raise schedulers.WorkersDiedError(
            f"{job.output}: every Dask worker that ran one of its blocks died "
            f"({err.allowed_failures + 1} of them, the last {err.last_worker.address}), killed "
            "for memory most often: see the workers' logs. The blocks finished are recorded: "
            "run again to resume, with a smaller batch_size (--batch-size) or fewer workers "
            "where memory ran out"
        ) from err
    except Exception as err:  # a CommClosedError, a future "cancelled: connection lost"...
        if client.status == "running":
            raise
        # The scheduler went (killed, its machine down): Dask's "ConnectionPool.gather: Stream
        # is closed" named neither it nor the result, after 30 s more on the clean-up below.
        raise ConnectionError(
            f"lost the Dask scheduler {client.scheduler.address} while segmenting "
            f"{job.output} ({type(err).__name__}: {' '.join(str(err).split())}); the blocks "
            "finished are recorded: run again on a running cluster to resume"
        ) from err
    finally:
        # Not with the scheduler gone: each call would wait for Dask's timeout in vain.
        if client.status == "running":
            client.cancel(list(pending.values()))
            # A worker killed mid-run fails the scheduler's broadcast: the run's own outcome
            # stands. A plugin left behind is dropped by a later run once this client is gone.
            try:
                client.unregister_worker_plugin(plugin.name)
            except Exception as err:
                log.warning("could not unregister %s from the workers: %r", plugin.name, err)


# A connection to a worker that died: what distributed and tornado raise for it.
_CLOSED = (distributed.comm.core.CommClosedError, tornado.iostream.StreamClosedError)


def _register(client: Any, plugin: ModelPlugin, output: Any, tries: int = 3) -> None:
    """Register ``plugin`` on every worker. A worker that dies as the scheduler sends it out
    (before the scheduler has noticed: an OOM kill) fails the call with its closed
    connection, the plugin kept on the scheduler: sent again to the workers left (a joining
    one gets it from the scheduler); a ConnectionError naming ``output`` once ``tries`` fail."""
    for attempt in range(1, tries + 1):
        try:
            client.register_plugin(plugin, name=plugin.name)
            return
        except _CLOSED as err:  # not a worker's own error in the plugin's setup: raised as it is
            if client.status != "running" or attempt == tries:
                raise ConnectionError(
                    f"{output}: Dask workers kept dying as the run's model was sent to them "
                    f"({type(err).__name__}: {' '.join(str(err).split())}); nothing was "
                    "computed: run again to segment it"
                ) from err
            log.warning("a worker died as the model was sent out (%s); sending it again", err)
            time.sleep(0.5 * attempt)  # for the scheduler to see the death (0.05 s was enough)
            client.wait_for_workers(1, timeout=60)


def _thread_given_back() -> contextlib.AbstractContextManager[Any]:
    """Inside a Dask task (``segment`` called from one: a prefect-dask task runner's), the
    task's thread seceded from its worker's pool while the blocks run, so they can run on
    that worker; on one of a single thread they would wait for it forever."""
    try:
        distributed.get_worker()
    except ValueError:  # not in a task: the driver's own thread
        return contextlib.nullcontext()
    return distributed.worker_client()
