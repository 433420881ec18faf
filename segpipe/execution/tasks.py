"""The unit of work of a Dask task: one block of tiles predicted, stitched and written.

:func:`segment_block` takes a :class:`Block` (``task_tiles`` x ``task_tiles`` tiles, one Zarr
shard; in blend mode several), predicts it with the worker's model through the stitcher
(:func:`segpipe.execution.stitching.predict_parts`), writes each shard block to the result as
soon as it is stitched (while the result is still the run's: ``Job.started``) and returns the
block's per-tile class counts. Tasks carry paths, geometry and a few kilobytes of the
foreground mask, never pixel arrays, so the graph stays small for any image size. A task's
thread reads and writes; its forward passes run on the process's model thread
(:mod:`segpipe.execution.pipeline`), shared by all tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import zarr

from segpipe.execution.lease import Lease, RunEnded
from segpipe.execution.pipeline import ModelStage
from segpipe.execution.predictor import Predictor
from segpipe.execution.stitching import (
    RegionPrediction,
    Stitching,
    bounds,
    model_errors,
    predict_parts,
)
from segpipe.geometry.foreground import MaskPatch
from segpipe.geometry.tiling import Box, Tile, exact_side
from segpipe.io.files import URLPath
from segpipe.io.readers import Reader
from segpipe.io.readers.cached import cached_reads
from segpipe.results import FOREGROUND_LABEL, write_block
from segpipe.results.labels import label_block_arrays, label_images
from segpipe.results.layout import block_level_arrays

__all__ = [
    "BLEND_TASK_BYTES",
    "Block",
    "BlockResult",
    "Job",
    "RunEnded",
    "blend_task_side",
    "group_blocks",
    "install_predictor",
    "predictor_for",
    "remove_predictor",
    "segment_block",
    "stage_for",
    "with_exact_side",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Models ready on this process, by run (model fingerprint + run id, so runs sharing a cluster
# never touch each other's): filled by ModelPlugin.setup (or by the driver when it runs tasks
# itself), read by every task. Threaded workers share one process, so each entry counts the
# workers holding it and is built once; the lock guards their concurrent setups.
_PREDICTORS: dict[str, tuple[Predictor, int]] = {}
# Each run's model thread (execution.pipeline), started by the first task that needs it.
_STAGES: dict[str, ModelStage] = {}


@dataclass(frozen=True)
class _RunArrays:
    """The arrays a run's blocks write: each level's mask, probabilities and mask label, and
    the foreground label's levels (where the result has one)."""

    levels: list[tuple[zarr.Array, zarr.Array, zarr.Array]]
    foreground: list[zarr.Array] | None


# Each run's result arrays, opened by its first task here (a few dozen small reads): keyed by
# the run, never by path alone, so a later run that replaced the result opens it afresh.
_ARRAYS: dict[str, _RunArrays] = {}
# Each run's image with the tiles its tasks decoded kept (neighbouring blocks read each
# other's as halo): per run, like the arrays, so a changed file is never read from here.
_READERS: dict[str, Reader] = {}
# Each run's exact window side in this process (:func:`_run_side`), decided by its first task.
_SIDES: dict[str, int] = {}
_REGISTRY_LOCK = threading.Lock()


# Each run's writes in this process (segment_block), ended by remove_predictor.
_LEASES: dict[str, Lease] = {}


@dataclass(frozen=True, kw_only=True)
class Job(Stitching):
    """Everything a task needs besides its block: the stitching, where the pixels come from
    and where the result goes. Small and picklable."""

    reader: Reader
    level: int
    output: str | os.PathLike[str]  # a local path, or a URLPath with its storage options
    predictor_key: str  # the run's model in each worker's registry (install_predictor)
    # Whether a task may write each of its shard blocks whole, the tiles it does not compute
    # as 0: true unless the run resumes a result whose recorded tiles it must keep as stored.
    whole_shards: bool = False
    # The leading channels of the pixels the model takes (an RGB model leaves an RGBA image's
    # alpha out: models.source_checks.channels_taken); None: all of them.
    channels: int | None = None
    # The ``started`` stamp of the result the driver prepared: each block is written only
    # while the result at ``output`` still carries it (another run may replace it mid-run:
    # write_block checks). None: not checked.
    started: str | None = None


@dataclass(frozen=True)
class Block:
    """One task's work: the tiles of each shard block of the result it writes (one, all or
    part of its tiles; in blend mode several, :func:`group_blocks`) and, where a foreground
    mask chose them, the mask's cells over each shard block's tiles (``foreground``, one
    patch per shard block, written as the result's foreground label image) and in exact mode
    the boxes of them to compute (level pixels); their other pixels are written as not
    computed, 0. ``boxes`` None: every pixel."""

    shards: tuple[tuple[Tile, ...], ...]
    boxes: tuple[Box, ...] | None = None
    foreground: tuple[MaskPatch, ...] | None = None

    def __post_init__(self) -> None:
        if self.foreground is not None and len(self.foreground) != len(self.shards):
            raise ValueError(
                f"a block of {len(self.shards)} shard blocks needs as many foreground patches, "
                f"got {len(self.foreground)}"
            )

    @property
    def tiles(self) -> tuple[Tile, ...]:
        """Every tile of the block, shard by shard."""
        return tuple(t for shard in self.shards for t in shard)

    @property
    def key(self) -> str:
        """The block's name within a run: its first tile's index."""
        return f"{self.tiles[0].index[0]}-{self.tiles[0].index[1]}"


@dataclass(frozen=True)
class BlockResult:
    tiles: tuple[tuple[int, int], ...]
    class_pixels: tuple[np.ndarray, ...]  # (C,) int64 per tile
    windows: int


def install_predictor(key: str, make: Callable[[], Predictor]) -> None:
    """Make ``make()`` the predictor tasks of run ``key`` use in this process.

    Built once per process: a second worker of the same process (a threaded cluster) only
    takes another hold on it, released by :func:`remove_predictor`.
    """
    with _REGISTRY_LOCK:
        predictor, holders = _PREDICTORS.get(key, (None, 0))
        _PREDICTORS[key] = (predictor or make(), holders + 1)


def remove_predictor(key: str) -> None:
    """Release one hold on run ``key``'s predictor; the last one waits for the run's writes
    in flight here and refuses later ones (:class:`RunEnded`), frees its memory and stops its
    model thread."""
    stage = lease = reader = None
    with _REGISTRY_LOCK:
        predictor, holders = _PREDICTORS.get(key, (None, 0))
        if predictor is None or holders <= 1:
            _PREDICTORS.pop(key, None)
            _ARRAYS.pop(key, None)
            reader = _READERS.pop(key, None)
            _SIDES.pop(key, None)
            stage, lease = _STAGES.pop(key, None), _LEASES.pop(key, None)
        else:
            _PREDICTORS[key] = (predictor, holders - 1)
    if lease is not None:
        lease.end()
    if stage is not None:
        stage.close()
    # A worker's copy closed now, not when a collection finds it: a long-lived worker of an
    # archive run held every finished image's file open. A reader of this process's own (a
    # "sync" run's) is its opener's to close.
    if getattr(reader, "unpickled", False):
        cast(Any, reader).close()


def _per_run(registry: dict[str, T], key: str, make: Callable[[], T]) -> T:
    """``registry``'s entry for run ``key``, made by ``make()`` on first use, only while the
    run's predictor is installed here: a task still running when its run ended (cancelled,
    or a sibling failed) and :func:`remove_predictor` dropped the run's entries would
    otherwise make one again that nothing drops (its decoded tiles and open file kept for
    the worker's life). It raises instead; its run has no use for its result."""
    with _REGISTRY_LOCK:
        if key not in _PREDICTORS:
            predictor_for(key)  # raises, naming the run and the process
        if key not in registry:
            registry[key] = make()
        return registry[key]


def stage_for(key: str) -> ModelStage:
    """The model thread of run ``key`` in this process, fed by every task of the run."""
    return _per_run(_STAGES, key, lambda: ModelStage(_PREDICTORS[key][0]))


def predictor_for(key: str) -> Predictor:
    """The predictor :func:`install_predictor` made ready for run ``key`` in this process."""
    try:
        return _PREDICTORS[key][0]
    except KeyError:
        raise RuntimeError(
            f"the model of run {key} is not loaded in this process (pid {os.getpid()}): the "
            "run has ended here (finished, cancelled, or a sibling task failed), or its "
            "setup (segpipe's worker plugin, which every worker joining gets) failed on this "
            "worker: see the worker's log"
        ) from None


def segment_block(block: Block, job: Job) -> BlockResult:
    """Predict, stitch and write one block of tiles; the unit of work of a Dask task. A blend
    task's block may join several shard blocks (:func:`group_blocks`): each is written apart.

    The calling thread reads and writes; the forward passes run on the process's model
    thread (:func:`stage_for`), batched with other tasks' windows. Exact-mode windows are
    ``job.exact_side``, or as large as this process's device allows (:func:`_run_side`).
    """
    stage = stage_for(job.predictor_key)
    lease = _per_run(_LEASES, job.predictor_key, lambda: Lease(job.predictor_key))
    predictor = stage.predictor
    job = _run_side(job, predictor)
    tiles = block.tiles
    # One write per shard block, in steps a forward pass may come between, each as soon as
    # its windows are stitched (a blend task's first shards while its last windows run).
    arrays, step = _result_arrays(job), stage.io_section
    patches = block.foreground or (None,) * len(block.shards)
    regions = [bounds([t.box for t in part]) for part in block.shards]
    indices, counts, windows = [], [], 0
    for prediction in predict_parts(
        tiles,
        # A block holds its computed tiles only (a tissue edge's may be one tile high): the
        # cache is sized for the rows of whole shard blocks the tasks go through.
        _run_reader(job, max(bounds([t.box for t in tiles]).shape[0], _shard_rows(arrays))),
        stage,
        job,
        parts=regions,
        level=job.level,
        batch_size=predictor.config.batch_size,
        boxes=block.boxes,
        channels=job.channels,
        contract=predictor.contract,
    ):
        n = regions.index(prediction.region)
        part, patch = block.shards[n], patches[n]
        with stage.io_section():
            region, probabilities = prediction.region, prediction.probabilities
            if job.whole_shards:
                region, probabilities = _whole_shard(arrays.levels[0][0], prediction)
            labels = []
            if patch is not None and arrays.foreground is not None:
                labels.append((arrays.foreground, patch.pixels(region)))
        with lease.writing():
            mask = write_block(
                job.output,
                region,
                probabilities,
                step=step,
                arrays=arrays.levels,
                labels=labels,
                started=job.started,
            )
        with stage.io_section():
            for t in part:
                tile_mask = mask[t.box.relative_to(region)].ravel()
                counts.append(np.bincount(tile_mask, minlength=job.num_classes).astype(np.int64))
                indices.append(t.index)
        windows = prediction.windows
    return BlockResult(tuple(indices), tuple(counts), windows)


def with_exact_side(job: Job, max_input_pixels: int) -> Job:
    """``job`` with the side of its exact windows: the most tiles whose window's input fits
    ``max_input_pixels``, up to the whole level. A side past a block's is cut to the block
    (``exact_windows``): each block gets the windows a side of its own would give it, and the
    blocks of one size one shape."""
    if job.mode != "exact" or job.exact_side is not None:
        return job
    ny, nx = job.reader.level_shapes[job.level][:2]
    side = exact_side(Box(0, ny, 0, nx), job.tile, job.geometry, max_input_pixels)
    return dataclasses.replace(job, exact_side=side)


def _run_side(job: Job, predictor: Predictor) -> Job:
    """``job`` with its run's exact side in this process (:func:`with_exact_side`), from the
    device's memory as the run's first task here measured it. Once: a GPU's free memory
    shrinks as its allocator caches (blocks measuring it each would cut different shapes).
    Here, not in the driver: each worker's device is its own, and may join after the start."""
    if job.mode != "exact" or job.exact_side is not None:
        return job
    # A forward pass, once, on the channels the model takes: not under the registry's lock.
    channels = job.channels or job.reader.level_shapes[job.level][2]
    with model_errors(job.reader.path, f"its memory probe, zeros of {channels} channels"):
        per_pixel = predictor.bytes_per_pixel(channels)

    def decide() -> int:
        budget = int(predictor.memory_budget() / per_pixel)
        return cast(int, with_exact_side(job, budget).exact_side)

    return dataclasses.replace(job, exact_side=_per_run(_SIDES, job.predictor_key, decide))


def _whole_shard(array: zarr.Array, prediction: RegionPrediction) -> tuple[Box, np.ndarray]:
    """``prediction``'s part widened to the whole shard block of ``array`` it lies in, the
    pixels added 0 (not computed: the store's fill value, as the tiles recorded as
    background keep). A part of some of a block's tiles would otherwise go through Zarr's
    partial writes (13 of the 43 blocks of the 8192² demo slide with 30% tissue)."""
    region, probabilities = prediction.region, prediction.probabilities
    if array.shards is None:
        return region, probabilities
    (sy, sx), (ny, nx) = array.shards[-2:], array.shape[-2:]
    y0, x0 = region.y0 // sy * sy, region.x0 // sx * sx
    whole = Box(y0, min(y0 + sy, ny), x0, min(x0 + sx, nx))
    if whole == region:
        return region, probabilities
    padded = np.zeros((probabilities.shape[0], *whole.shape), dtype=probabilities.dtype)
    padded[(slice(None), *region.relative_to(whole))] = probabilities
    return whole, padded


# What a blend task's square may hold: a window across a task's edge is computed by both
# tasks, about one window in (side / stride) more along each axis, so the larger the better
# up to memory. 8192² with 256 px windows every 192 px (3 classes, 2 cores, alternating):
# 2116 windows and 59.9-60.9 s at 2048 px tasks (peak RSS 928-941 MiB), 1936 windows and
# 56.7-57.3 s at 4096 (1349-1374 MiB).
BLEND_TASK_BYTES = 384 * 2**20
BLEND_TASK_MAX_SIDE = 4096


def blend_task_side(block_side: int, num_classes: int) -> int:
    """The side, pixels, of a blend task's square of shard blocks of ``block_side``: the most
    blocks whose weighted sums (``num_classes`` float32 and the weight a pixel) and read
    pixels, about ``4 (num_classes + 2)`` bytes a pixel, fit :data:`BLEND_TASK_BYTES`, at
    most 4096 px, at least one block.

    >>> blend_task_side(1024, 3), blend_task_side(1024, 9), blend_task_side(512, 30)
    (4096, 2048, 1536)
    """
    per_pixel = 4 * (num_classes + 2)
    side = min(math.isqrt(BLEND_TASK_BYTES // per_pixel), BLEND_TASK_MAX_SIDE)
    return max(block_side, side // block_side * block_side)


def group_blocks(blocks: Sequence[Block], block_side: int, task_side: int) -> list[Block]:
    """``blocks`` (of ``block_side`` pixels a side) joined in squares of at least
    ``task_side`` pixels, one task each, row-major; boxes are not kept (blend mode has none).

    >>> from segpipe.geometry.tiling import tile_grid
    >>> grid = tile_grid((40, 30), 10)
    >>> blocks = [Block((tuple(b),)) for b in grid.blocks(1)]
    >>> [len(b.shards) for b in group_blocks(blocks, 10, 20)]
    [4, 2, 4, 2]
    """
    per = max(1, -(-task_side // block_side))
    groups: dict[tuple[int, int], list[Block]] = {}
    for b in blocks:
        first = b.tiles[0].box
        key = (first.y0 // block_side // per, first.x0 // block_side // per)
        groups.setdefault(key, []).append(b)
    joined = []
    for _, group in sorted(groups.items()):
        shards = tuple(s for b in group for s in b.shards)
        patches = [p for b in group for p in b.foreground or ()]
        joined.append(Block(shards, None, tuple(patches) if patches else None))
    return joined


def _run_reader(job: Job, rows: int) -> Reader:
    """``job``'s image for its run's tasks in this process, the tiles they decode kept, as
    many as a row of blocks ``rows`` pixels high needs."""
    return _per_run(
        _READERS, job.predictor_key, lambda: cached_reads(job.reader, rows, level=job.level)
    )


def _shard_rows(arrays: _RunArrays) -> int:
    """Rows of one shard block of the result (level 0)."""
    mask = arrays.levels[0][0]
    return int((mask.shards or mask.chunks)[-2])


def _result_arrays(job: Job) -> _RunArrays:
    """The arrays each block of ``job``'s run writes, opened once per run in this process."""

    def open_arrays() -> _RunArrays:
        store = job.output if isinstance(job.output, URLPath) else os.fspath(job.output)
        foreground = None
        if FOREGROUND_LABEL in label_images(store):
            foreground = label_block_arrays(store, FOREGROUND_LABEL)
        return _RunArrays(block_level_arrays(store), foreground)

    return _per_run(_ARRAYS, job.predictor_key, open_arrays)
