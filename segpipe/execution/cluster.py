"""Where tasks run: local clusters laid out for the machine, connections to running ones, the
per-worker model plugin, and the loop that runs a result's blocks and reports each one."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dask
import distributed
import torch

from segpipe import models
from segpipe.execution.predictor import InferenceConfig, Predictor, resolve_device
from segpipe.execution.tasks import (
    BlockResult,
    Job,
    install_predictor,
    remove_predictor,
    segment_block,
)
from segpipe.geometry.tiling import Tile

__all__ = [
    "ClusterPlan",
    "ModelPlugin",
    "choose_scheduler",
    "connect",
    "has_cuda",
    "local_cluster",
    "plan_for_device",
    "plan_local_cluster",
    "resolve_amp",
    "run_blocks",
    "run_key",
]

log = logging.getLogger(__name__)


def run_key(model_sha256: str) -> str:
    """A run's name on a cluster: the model's fingerprint and a fresh id.

    Plugin names are global to a cluster, so two runs of one model on a shared cluster would
    replace and then unregister each other's plugin if named by the model alone.
    """
    return f"{model_sha256[:16]}-{uuid.uuid4().hex[:12]}"


class ModelPlugin(distributed.WorkerPlugin):
    """Loads a run's model once per worker process, not once per tile.

    The device is resolved here, on the worker: ``"auto"`` is this worker's GPU when it has
    one, whatever the driver has.
    """

    def __init__(self, key: str, source: str | torch.nn.Module, config: InferenceConfig) -> None:
        self.key = key
        self.source = source
        self.config = config
        self.name = f"segpipe-model-{key}"

    def setup(self, worker: Any = None) -> None:
        try:
            device = resolve_device(self.config.device)
        except RuntimeError as err:
            where = f"worker {worker.address}" if worker is not None else f"pid {os.getpid()}"
            raise RuntimeError(
                f"{where}: {err}; run on workers with a CUDA GPU, or use device='auto' or 'cpu'"
            ) from None
        config = dataclasses.replace(self.config, device=str(device))

        def make() -> Predictor:
            source = self.source
            net = source if isinstance(source, torch.nn.Module) else models.load(source)
            return Predictor(net, config)

        install_predictor(self.key, make)

    def teardown(self, worker: Any = None) -> None:
        remove_predictor(self.key)


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU in this process (run on workers by ``client.run``)."""
    return bool(torch.cuda.is_available())


def resolve_amp(amp: bool | None, device: str, client: Any) -> bool:
    """The concrete autocast setting of a run, as its workers will apply it.

    ``amp=None`` means on CUDA only: on when ``device`` is not ``"cpu"`` and every worker of
    ``client`` sees a GPU (None: this process, which runs the tasks or the local cluster).
    A result's identity records this value, so it must be the one the workers use.
    """
    if amp is not None:
        return amp
    if device == "cpu":
        return False
    cuda = set(client.run(has_cuda).values()) if client is not None else {has_cuda()}
    if not cuda:
        raise ValueError(
            f"device {device!r} with amp=None: the cluster has no workers yet to say whether "
            "they have a GPU; set amp=True or amp=False, or start its workers first"
        )
    if len(cuda) > 1:
        raise ValueError(
            f"device {device!r} with amp=None: some workers have a CUDA GPU and some do not, "
            "so the run would mix autocast and float32; set amp=True or amp=False"
        )
    return cuda == {True}


@dataclass(frozen=True)
class ClusterPlan:
    """How to lay out a local cluster: ``gpus`` > 0 means one worker process per GPU, else
    ``n_workers`` threads of this process."""

    n_workers: int
    threads_per_worker: int
    torch_threads: int
    gpus: int = 0

    @property
    def resources(self) -> dict[str, int]:
        return {"GPU": 1} if self.gpus else {}


def plan_local_cluster(
    device: torch.device,
    *,
    cpus: int | None = None,
    gpus: int | None = None,
    n_workers: int | None = None,
) -> ClusterPlan:
    """One worker per GPU on CUDA; on the CPU, worker threads that share the cores.

    Each CPU worker runs one task at a time and gives torch its share of the cores: torch's
    intra-op threads beat Dask threads fighting over the GIL-free conv kernels, and a second
    worker overlaps one tile's reads and writes with another's compute. ``torch_threads`` is
    that share: the workers are threads of one process, each forward pass runs its own team of
    that many threads, so the process's total stays at the cores.

    >>> plan_local_cluster(torch.device("cpu"), cpus=8)
    ClusterPlan(n_workers=4, threads_per_worker=1, torch_threads=2, gpus=0)
    >>> plan_local_cluster(torch.device("cuda"), cpus=16, gpus=2)
    ClusterPlan(n_workers=2, threads_per_worker=1, torch_threads=8, gpus=2)
    """
    cpus = cpus or os.cpu_count() or 1
    if device.type == "cuda":
        gpus = gpus if gpus is not None else torch.cuda.device_count()
        gpus = max(gpus, 1)
        return ClusterPlan(gpus, 1, max(1, cpus // gpus), gpus)
    workers = n_workers or max(1, min(4, cpus // 2))
    return ClusterPlan(workers, 1, max(1, cpus // workers), 0)


def _start_local_cluster(plan: ClusterPlan) -> Any:
    # ":0": a free port, so runs side by side never fight over 8787.
    if plan.gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            log.warning("dask-cuda is not installed: using one plain worker per GPU")
        else:
            return LocalCUDACluster(
                threads_per_worker=1, resources=plan.resources, dashboard_address=":0"
            )
        # One process per GPU: a process owns its CUDA context.
        return distributed.LocalCluster(
            n_workers=plan.n_workers,
            threads_per_worker=plan.threads_per_worker,
            processes=True,
            resources=plan.resources,
            dashboard_address=":0",
        )
    # Threads of this process: worker processes are started by spawn/forkserver, which
    # re-imports the caller's __main__ and breaks a plain script without a main guard; torch
    # releases the GIL in its kernels, so threads lose little.
    return distributed.LocalCluster(
        n_workers=plan.n_workers,
        threads_per_worker=plan.threads_per_worker,
        processes=False,
        dashboard_address=":0",
    )


def plan_for_device(device: str, n_workers: int | None = None) -> ClusterPlan:
    """The layout of a local cluster for a run on ``device`` (a ``SegmentConfig.device``).

    A local cluster runs on this machine, so its layout follows this machine's GPUs (none:
    threads, even for ``device="cuda"``, whose workers then refuse with a clear message).
    """
    has_gpu = device != "cpu" and torch.cuda.is_available()
    return plan_local_cluster(torch.device("cuda" if has_gpu else "cpu"), n_workers=n_workers)


@contextlib.contextmanager
def local_cluster(plan: ClusterPlan) -> Iterator[str]:
    """A local cluster laid out by ``plan``, its workers up, yielding the scheduler's address;
    closed on exit.

    Many runs can share it by address (``SegmentConfig(scheduler=address)``), e.g. the images
    of one archive run, instead of each starting a cluster sized to the whole machine.
    """
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(_start_local_cluster(plan))
        with distributed.Client(cluster, set_as_default=False) as client:
            # A run asks the workers whether they have a GPU (resolve_amp): they must be up.
            client.wait_for_workers(len(cluster.workers), timeout="60s")
            log.info("local Dask cluster started; dashboard: %s", client.dashboard_link)
        if not plan.gpus:
            # The workers are threads of this process and a run connected by address leaves
            # torch's threads alone: give each worker its share of the cores here
            # (torch's thread count is process-wide), and the caller's back on exit.
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(plan.torch_threads)
        yield str(cluster.scheduler_address)


def choose_scheduler(scheduler: Any = None) -> Any:
    """The scheduler a run uses, first match wins:

    1. ``scheduler`` when given: ``"sync"``, an address, or a ``distributed.Client``;
    2. the ``distributed`` client active in this process (``distributed.get_client()``: the
       last one made here, or the worker's own inside a task);
    3. the ``scheduler-address`` of Dask's config (env ``DASK_SCHEDULER_ADDRESS``);
    4. None: a local cluster started for the run.
    """
    if scheduler is not None:
        return scheduler
    try:
        return distributed.get_client()
    except ValueError:  # no client in this process
        pass
    return dask.config.get("scheduler-address", None)


@contextlib.contextmanager
def connect(scheduler: Any, plan: ClusterPlan) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, or None to run tasks in this process.

    The scheduler is chosen by :func:`choose_scheduler`: an explicit ``scheduler``
    (``"sync"`` runs every task here, in order: debugging, tiny images; an address like
    ``tcp://host:8786`` connects to a running scheduler; a ``Client`` is used as it is), else
    this process's active client, else Dask's ``scheduler-address`` config
    (``DASK_SCHEDULER_ADDRESS``), else a LocalCluster laid out by ``plan`` (closed on exit).
    """
    scheduler = choose_scheduler(scheduler)
    if scheduler == "sync":
        yield None
    elif isinstance(scheduler, distributed.Client):
        yield scheduler
    elif scheduler is None:
        with (
            _start_local_cluster(plan) as cluster,
            distributed.Client(cluster, set_as_default=False) as client,
        ):
            log.info("local Dask cluster started; dashboard: %s", client.dashboard_link)
            yield client
    elif isinstance(scheduler, str):
        # Not the process's default client: runs in threads side by side (the images of an
        # archive run) would each set and reset Dask's global scheduler, and another run's
        # plain dask compute (the pyramid) would find a closed client or none.
        with distributed.Client(scheduler, timeout="30s", set_as_default=False) as client:
            log.info("connected to %s; dashboard: %s", scheduler, client.dashboard_link)
            yield client
    else:
        raise TypeError(
            f"scheduler must be None, 'sync', an address like 'tcp://host:8786' or a "
            f"distributed.Client; got {scheduler!r}"
        )


def _gpu_resources(client: Any) -> dict[str, int] | None:
    workers = client.scheduler_info().get("workers", {}).values()
    if workers and all(w.get("resources", {}).get("GPU") for w in workers):
        return {"GPU": 1}
    return None


def run_blocks(
    blocks: list[list[Tile]],
    job: Job,
    *,
    client: Any,
    model: str | torch.nn.Module,
    config: InferenceConfig,
    on_result: Callable[[BlockResult], None],
) -> None:
    """Run every block, calling ``on_result`` in the driver as each one finishes.

    A failing task cancels the rest and raises; blocks finished before it have been reported,
    so a re-run resumes from them.
    """
    plugin = ModelPlugin(job.predictor_key, model, config)
    if client is None:
        plugin.setup()
        try:
            for block in blocks:
                on_result(segment_block(block, job))
        finally:
            plugin.teardown()
        return

    # Registered for this run only, by the run's name: the workers of a shared cluster get
    # their memory back, and other runs' plugins are left alone.
    try:
        client.register_plugin(plugin, name=plugin.name)
    except BaseException:
        # A worker refused (no CUDA there): workers that join later must not load it. The
        # worker's error is the one to report, not a failure of this clean-up.
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin.name)
        raise
    gpu = _gpu_resources(client) if config.device != "cpu" else None
    keys = [f"segpipe-block-{job.predictor_key}-{b[0].index[0]}-{b[0].index[1]}" for b in blocks]
    futures = client.map(segment_block, blocks, job=job, pure=False, resources=gpu, key=keys)
    try:
        for fut in distributed.as_completed(futures, loop=client.loop):
            on_result(fut.result())
    finally:
        client.cancel(futures)
        client.unregister_worker_plugin(plugin.name)
