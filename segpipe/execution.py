"""Running segmentation tasks on Dask: clusters, per-worker models, one task per tile block.

A task takes a block of output tiles (``task_tiles`` x ``task_tiles``, one Zarr shard), reads the
input it needs once, runs the worker's model on its windows in batches, stitches them through a
sink, writes the block to the result and returns the block's per-tile class counts. Tasks carry
paths and geometry, never pixel arrays, so the graph stays small for any image size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import distributed
import numpy as np
import torch

from segpipe import models
from segpipe.blending import BlendSink, CropSink, Sink
from segpipe.inference import InferenceConfig, Predictor
from segpipe.readers import Reader
from segpipe.results import write_block
from segpipe.tiling import (
    BlendLattice,
    Box,
    Geometry,
    Tile,
    Window,
    blend_windows,
    exact_window,
    mirror_indices,
)

__all__ = [
    "BlockResult",
    "ClusterPlan",
    "Job",
    "ModelPlugin",
    "connect",
    "plan_local_cluster",
    "read_mirrored",
    "run_blocks",
    "segment_block",
]

log = logging.getLogger(__name__)

# Models ready on this process, by fingerprint: filled once per worker by ModelPlugin.setup
# (or by the driver when it runs tasks itself), read by every task.
_PREDICTORS: dict[str, Predictor] = {}


@dataclass(frozen=True)
class Job:
    """Everything a task needs besides its tiles. Small and picklable."""

    reader: Reader
    level: int
    output: str
    model_key: str
    mode: str  # "exact" | "blend"
    tile: int
    geometry: Geometry
    num_classes: int
    lattice: BlendLattice | None = None
    sigma_scale: float = 0.125


@dataclass(frozen=True)
class BlockResult:
    tiles: tuple[tuple[int, int], ...]
    class_pixels: tuple[np.ndarray, ...]  # (C,) int64 per tile
    windows: int


def read_mirrored(reader: Reader, box: Box, level: int = 0) -> np.ndarray:
    """Pixels (y, x, C) of ``box`` of ``level``, mirrored where it leaves the image.

    Reads only the bounding box of the source pixels the mirror maps to.
    """
    ny, nx, _ = reader.level_shapes[level]
    iy = mirror_indices(box.y0, box.y1, ny)
    ix = mirror_indices(box.x0, box.x1, nx)
    y0, y1, x0, x1 = int(iy.min()), int(iy.max()) + 1, int(ix.min()), int(ix.max()) + 1
    src = reader.read(y0, y1, x0, x1, level=level)
    return src[np.ix_(iy - y0, ix - x0)]


def _windows(tiles: list[Tile], job: Job, region: Box) -> list[Window]:
    if job.mode == "exact":
        return [exact_window(t, job.tile, job.geometry) for t in tiles]
    if job.lattice is None:
        raise ValueError("blend mode needs a lattice")
    return blend_windows(job.lattice, region)


def _bounds(boxes: list[Box]) -> Box:
    return Box(
        min(b.y0 for b in boxes),
        max(b.y1 for b in boxes),
        min(b.x0 for b in boxes),
        max(b.x1 for b in boxes),
    )


def predictor_for(key: str) -> Predictor:
    try:
        return _PREDICTORS[key]
    except KeyError:
        raise RuntimeError(
            f"model {key[:12]} is not loaded in this process (pid {os.getpid()}); "
            "segment registers it on every worker: was the worker started afterwards "
            "without the segpipe plugin?"
        ) from None


def segment_block(tiles: list[Tile], job: Job) -> BlockResult:
    """Predict, stitch and write one block of tiles; the unit of work of a Dask task."""
    predictor = predictor_for(job.model_key)
    region = _bounds([t.box for t in tiles])
    windows = _windows(tiles, job, region)
    source_box = _bounds([w.input for w in windows])
    pixels = read_mirrored(job.reader, source_box, job.level)

    sink: Sink = (
        CropSink(region, job.num_classes)
        if job.mode == "exact"
        else BlendSink(region, job.num_classes, sigma_scale=job.sigma_scale)
    )
    batch = max(1, predictor.config.batch_size)
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        stack = np.stack([pixels[w.input.relative_to(source_box)] for w in chunk])
        for w, p in zip(chunk, predictor(stack), strict=True):
            h, wd = w.output.shape
            sink.add(w, p[:, w.crop : w.crop + h, w.crop : w.crop + wd])
    probs = sink.result()

    # One write per block: the block is one whole shard of the result.
    mask = write_block(job.output, region, probs)
    counts = [
        np.bincount(mask[t.box.relative_to(region)].ravel(), minlength=job.num_classes).astype(
            np.int64
        )
        for t in tiles
    ]
    return BlockResult(tuple(t.index for t in tiles), tuple(counts), len(windows))


# --- workers and clusters --------------------------------------------------------------------


def load_model(source: str | os.PathLike | torch.nn.Module) -> torch.nn.Module:
    """A module as it is; a shipped model's name or a checkpoint path, loaded."""
    if isinstance(source, torch.nn.Module):
        return source
    return models.load(source)


class ModelPlugin(distributed.WorkerPlugin):
    """Loads the model once per worker process, not once per tile."""

    def __init__(self, key: str, source: str | torch.nn.Module, config: InferenceConfig) -> None:
        self.key = key
        self.source = source
        self.config = config
        self.name = f"segpipe-model-{key[:16]}"

    def setup(self, worker: Any = None) -> None:
        _PREDICTORS[self.key] = Predictor(load_model(self.source), self.config)

    def teardown(self, worker: Any = None) -> None:
        _PREDICTORS.pop(self.key, None)


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
