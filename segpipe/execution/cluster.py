"""Where tasks run: local clusters laid out for the machine, connections to running ones, the
per-worker model plugin, and the loop that runs a result's blocks and reports each one."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import distributed
import torch

from segpipe import models
from segpipe.execution.predictor import InferenceConfig, Predictor
from segpipe.execution.tasks import (
    BlockResult,
    Job,
    install_predictor,
    remove_predictor,
    segment_block,
)
from segpipe.geometry.tiling import Tile

__all__ = ["ClusterPlan", "ModelPlugin", "connect", "plan_local_cluster", "run_blocks"]

log = logging.getLogger(__name__)


class ModelPlugin(distributed.WorkerPlugin):
    """Loads the model once per worker process, not once per tile."""

    def __init__(self, key: str, source: str | torch.nn.Module, config: InferenceConfig) -> None:
        self.key = key
        self.source = source
        self.config = config
        self.name = f"segpipe-model-{key[:16]}"

    def setup(self, worker: Any = None) -> None:
        net = self.source if isinstance(self.source, torch.nn.Module) else models.load(self.source)
        install_predictor(self.key, Predictor(net, self.config))

    def teardown(self, worker: Any = None) -> None:
        remove_predictor(self.key)


@dataclass(frozen=True)
class ClusterPlan:
    """How to lay out a local cluster: ``gpus`` > 0 means one worker per GPU."""

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
    """One worker per GPU on CUDA; on the CPU, processes that share the cores.

    Each CPU worker runs one task at a time and gives torch its share of the cores: torch's
    intra-op threads beat Dask threads fighting over the GIL-free conv kernels, and processes
    keep a slow tile's reads off the others' compute.

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
    if plan.gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            log.warning("dask-cuda is not installed: using one plain worker per GPU")
        else:
            return LocalCUDACluster(
                threads_per_worker=1, resources=plan.resources, dashboard_address=None
            )
    return distributed.LocalCluster(
        n_workers=plan.n_workers,
        threads_per_worker=plan.threads_per_worker,
        processes=True,
        resources=plan.resources or None,
        dashboard_address=None,
    )


@contextlib.contextmanager
def connect(scheduler: Any, plan: ClusterPlan) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, or None to run tasks in this process.

    ``scheduler``: None starts a LocalCluster laid out by ``plan`` (closed on exit);
    ``"sync"`` runs every task here, in order (debugging, tiny images); a string address
    (``tcp://host:8786``) connects to a running scheduler; a ``Client`` is used as it is.
    """
    if scheduler == "sync":
        yield None
    elif isinstance(scheduler, distributed.Client):
        yield scheduler
    elif scheduler is None:
        with _start_local_cluster(plan) as cluster, distributed.Client(cluster) as client:
            yield client
    elif isinstance(scheduler, str):
        with distributed.Client(scheduler, timeout="30s") as client:
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
    plugin = ModelPlugin(job.model_key, model, config)
    if client is None:
        plugin.setup()
        try:
            for block in blocks:
                on_result(segment_block(block, job))
        finally:
            plugin.teardown()
        return

    # Registered for this run only: the workers of a shared cluster get their memory back.
    client.register_plugin(plugin, name=plugin.name)
    gpu = _gpu_resources(client) if config.device != "cpu" else None
    run = uuid.uuid4().hex[:8]
    keys = [f"segpipe-block-{run}-{b[0].index[0]}-{b[0].index[1]}" for b in blocks]
    futures = client.map(segment_block, blocks, job=job, pure=False, resources=gpu, key=keys)
    try:
        for fut in distributed.as_completed(futures):
            on_result(fut.result())
    finally:
        client.cancel(futures)
        client.unregister_worker_plugin(plugin.name)
