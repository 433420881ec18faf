"""How a local cluster is laid out for this machine: workers, processes, threads, GPUs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from dask.system import CPU_COUNT

from segpipe.execution.main_module import main_reimport_is_safe

__all__ = ["ClusterPlan", "plan_for_device", "plan_local_cluster"]


@dataclass(frozen=True)
class ClusterPlan:
    """How to lay out a local cluster: ``n_workers`` workers, threads of this process, or with
    ``processes`` worker processes (sharing one GPU, or dask-cuda's, one per GPU). ``gpus`` > 0:
    the workers run on the GPU. ``threads_per_worker`` are a worker's I/O threads (each runs
    one task: read, stitch, write), ``torch_threads`` its model thread's team."""

    n_workers: int
    threads_per_worker: int
    torch_threads: int
    gpus: int = 0
    processes: bool = False

    @property
    def resources(self) -> dict[str, int]:
        return {"GPU": 1} if self.gpus else {}


def plan_local_cluster(
    device: torch.device,
    *,
    cpus: int | None = None,
    gpus: int | None = None,
    n_workers: int | None = None,
    processes: bool | None = None,
) -> ClusterPlan:
    """One worker per device (each GPU; the CPU is one), with I/O threads that follow the cores.

    A worker's tasks run in its I/O threads and hand their windows to the process's model
    threads (``execution.pipeline``): on a GPU the I/O threads keep the device fed; on the CPU
    the passes take every core (``torch_threads``: one wide pass, or narrow ones side by
    side) and the I/O threads what they leave. ``n_workers`` on the CPU splits the I/O threads
    over that many workers (still one stage: they are threads of one process).

    One GPU is shared by ``n_workers`` worker processes (default: one per 4 cores, 4 at
    most), each with its own GIL: on an H200 host of 16 cores, one process's I/O threads held
    the pipeline to 43 Mpx/s (null model, 8192², 4 to 16 threads alike) and the shipped model
    to 33-38 (the device 45% busy), while 4 processes side by side ran 98 together. Processes
    only where the caller's ``__main__`` may be re-imported (``main_reimport_is_safe``; or
    ``processes=True``), else one threaded worker. Several GPUs get a process each (the first
    ``n_workers`` of them) where dask-cuda, which tells each its device, is installed; else
    one threaded worker, on the first, ``processes=True`` or not.

    >>> plan_local_cluster(torch.device("cpu"), cpus=8)
    ClusterPlan(n_workers=1, threads_per_worker=4, torch_threads=8, gpus=0, processes=False)
    >>> plan_local_cluster(torch.device("cuda"), cpus=16, gpus=1, processes=True)
    ClusterPlan(n_workers=4, threads_per_worker=3, torch_threads=4, gpus=1, processes=True)
    >>> plan_local_cluster(torch.device("cuda"), cpus=16, gpus=1, processes=False)
    ClusterPlan(n_workers=1, threads_per_worker=8, torch_threads=16, gpus=1, processes=False)
    >>> plan_local_cluster(torch.device("cuda"), cpus=16, gpus=2, processes=True)  # no dask-cuda
    ClusterPlan(n_workers=1, threads_per_worker=8, torch_threads=16, gpus=2, processes=False)
    """
    # Dask's count honours CPU affinity and cgroup quotas (taskset, Slurm, docker --cpus).
    cpus = cpus or CPU_COUNT
    if device.type == "cuda":
        gpus = gpus if gpus is not None else torch.cuda.device_count()
        gpus = max(gpus, 1)
        if gpus > 1:
            # dask-cuda tells each worker process its GPU: one each, as many as asked; without
            # it nothing does, and one worker takes the first.
            workers = min(gpus, n_workers or gpus)
            possible = workers > 1 and _dask_cuda_installed()
        else:
            workers = n_workers or max(1, min(4, cpus // 4))
            possible = workers > 1
        if processes is None:
            processes = possible and main_reimport_is_safe()
        processes = processes and (possible or gpus == 1)
        workers = workers if processes else 1
        share = max(1, cpus // workers)
        return ClusterPlan(workers, _io_threads(share - 1), share, gpus, processes)
    io = _io_threads(cpus // 2)
    workers = n_workers or 1
    return ClusterPlan(workers, max(1, io // workers), cpus, 0)


def _dask_cuda_installed() -> bool:
    return importlib.util.find_spec("dask_cuda") is not None


def _io_threads(cores: int) -> int:
    # Two at least: one reads the next block while another writes the last; eight at most,
    # past which more blocks in flight only cost memory.
    return max(2, min(8, cores))


def plan_for_device(
    device: str, n_workers: int | None = None, *, processes: bool | None = None
) -> ClusterPlan:
    """The layout of a local cluster for a run on ``device`` (a ``SegmentConfig.device``);
    ``processes=False``: of this process's threads (a run that runs its blocks itself).

    A local cluster runs on this machine, so its layout follows this machine's GPUs (none:
    threads, even for ``device="cuda"``, whose workers then refuse with a clear message).
    """
    has_gpu = device != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda" if has_gpu else "cpu")
    # A GPU named by its index is that one alone: dask-cuda's workers, one a GPU, each see
    # their own as cuda:0, and would each take "cuda:1" for another one.
    gpus = 1 if has_gpu and device.startswith("cuda:") else None
    return plan_local_cluster(dev, gpus=gpus, n_workers=n_workers, processes=processes)
