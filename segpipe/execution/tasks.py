"""The overlap-tile stitcher, and the unit of work of a Dask task built on it.

:func:`predict_region` is the one place windows are cut, predicted and stitched: it takes the
tiles of a region, reads the input they need once (mirrored at the image border), runs a
:data:`~segpipe.execution.predictor.WindowPredictor` on the windows in batches and joins the
outputs through a sink (exact or blend, :class:`Stitching`). Two callers:

* :func:`segment_block`, one Dask task: a block of tiles (``task_tiles`` x ``task_tiles``,
  one Zarr shard) predicted by the worker's model, written to the result; it returns the
  block's per-tile class counts. Tasks carry paths and geometry, never pixel arrays, so the
  graph stays small for any image size. A task's thread reads and writes; its forward passes
  run on the process's model thread (:mod:`segpipe.execution.pipeline`), shared by all tasks.
* :func:`predict_labels`, a whole in-memory image (an :class:`~segpipe.io.readers.ArrayReader`)
  predicted by a model as it is: training validation, evaluation and benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import zarr
from torch import nn

from segpipe.execution.pipeline import ModelStage
from segpipe.execution.predictor import Predictor, WindowPredictor, window_probabilities
from segpipe.geometry.blending import BlendSink, CropSink, Sink
from segpipe.geometry.tiling import (
    BlendLattice,
    Box,
    Geometry,
    Tile,
    Window,
    blend_windows,
    exact_side,
    exact_windows,
    tile_grid,
)
from segpipe.io.files import URLPath
from segpipe.io.readers import ArrayReader, ImageReadError, Reader, read_mirrored
from segpipe.models import geometry_of
from segpipe.results import class_map, write_block
from segpipe.results.layout import block_level_arrays

__all__ = [
    "BlockResult",
    "Job",
    "PredictionError",
    "RegionPrediction",
    "Stitching",
    "install_predictor",
    "predict_labels",
    "predict_probabilities",
    "predict_region",
    "predictor_for",
    "remove_predictor",
    "segment_block",
    "stage_for",
]

log = logging.getLogger(__name__)

# Models ready on this process, by run (model fingerprint + run id, so runs sharing a cluster
# never touch each other's): filled by ModelPlugin.setup (or by the driver when it runs tasks
# itself), read by every task. Threaded workers share one process, so each entry counts the
# workers holding it and is built once; the lock guards their concurrent setups.
_PREDICTORS: dict[str, tuple[Predictor, int]] = {}
# Each run's model thread (execution.pipeline), started by the first task that needs it.
_STAGES: dict[str, ModelStage] = {}
# Each run's result arrays, opened by its first task here (a few dozen small reads): keyed by
# the run, never by path alone, so a later run that replaced the result opens it afresh.
_ARRAYS: dict[str, list[tuple[zarr.Array, zarr.Array, zarr.Array]]] = {}
_REGISTRY_LOCK = threading.Lock()

MODES = ("exact", "blend")


@dataclass(frozen=True)
class Stitching:
    """Which windows cover a set of tiles and how their predictions are joined.

    Parameters
    ----------
    mode
        ``"exact"``: overlap-tile windows of ``exact_side`` output pixels (default: one per
        tile), cropped back (``exact_windows``, ``CropSink``); ``"blend"``: the windows of
        ``lattice`` averaged with Gaussian weights (``blend_windows``, ``BlendSink``).
    tile
        Output tile side, pixels (a multiple of ``geometry.multiple``).
    geometry
        The model's geometry.
    num_classes
        Channels of the model's output.
    lattice, sigma_scale
        Blend mode's global window lattice and its Gaussian's width (fraction of a window).
    exact_side
        Exact mode's window output side, a multiple of ``tile`` (None: ``tile``); any side
        gives the same result up to float rounding, a larger one pays the halo less often.
    """

    mode: str
    tile: int
    geometry: Geometry
    num_classes: int
    lattice: BlendLattice | None = None
    sigma_scale: float = 0.125
    exact_side: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"stitching mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "blend" and self.lattice is None:
            raise ValueError("blend mode needs a lattice (segpipe.geometry.tiling.blend_lattice)")

    def windows(self, tiles: Sequence[Tile], region: Box) -> list[Window]:
        """The windows that give ``tiles`` (whose bounding box is ``region``), row-major."""
        if self.mode == "blend" and self.lattice is not None:  # blend always has one
            return blend_windows(self.lattice, region)
        windows = exact_windows(region, self.exact_side or self.tile, self.geometry)
        return [w for w in windows if any(w.output.intersect(t.box) for t in tiles)]

    def sink(self, region: Box) -> Sink:
        """An empty sink for ``region`` that joins window outputs as the mode says."""
        if self.mode == "exact":
            return CropSink(region, self.num_classes)
        return BlendSink(region, self.num_classes, sigma_scale=self.sigma_scale)


@dataclass(frozen=True, kw_only=True)
class Job(Stitching):
    """Everything a task needs besides its tiles: the stitching, where the pixels come from
    and where the result goes. Small and picklable."""

    reader: Reader
    level: int
    output: str | os.PathLike[str]  # a local path, or a URLPath with its storage options
    predictor_key: str  # the run's model in each worker's registry (install_predictor)


@dataclass(frozen=True)
class RegionPrediction:
    """What :func:`predict_region` gives: ``probabilities`` ``(C, y, x)`` float32 over
    ``region`` (pixels of the level read) and the number of windows predicted."""

    region: Box
    probabilities: np.ndarray
    windows: int


@dataclass(frozen=True)
class BlockResult:
    tiles: tuple[tuple[int, int], ...]
    class_pixels: tuple[np.ndarray, ...]  # (C,) int64 per tile
    windows: int


def _bounds(boxes: Sequence[Box]) -> Box:
    return Box(
        min(b.y0 for b in boxes),
        max(b.y1 for b in boxes),
        min(b.x0 for b in boxes),
        max(b.x1 for b in boxes),
    )


def predict_region(
    tiles: Sequence[Tile],
    reader: Reader,
    predict: WindowPredictor,
    stitching: Stitching,
    *,
    level: int = 0,
    batch_size: int = 4,
) -> RegionPrediction:
    """Predict ``tiles`` of ``reader``'s ``level`` and stitch them: the overlap-tile stitcher.

    The input all windows need is read once (mirrored where it leaves the image, as in the
    U-Net paper); windows go to ``predict`` ``batch_size`` at a time, in row-major order, and
    each output, cropped by ``Window.crop``, into the stitching's sink. In exact mode and for a
    valid-padding model the result equals one forward pass over the whole mirrored image.

    Parameters
    ----------
    tiles
        Output tiles of ``tile_grid(shape, stitching.tile)``; the region is their bounding box.
    reader
        The image (a file's reader, or an :class:`~segpipe.io.readers.ArrayReader`).
    predict
        ``(N, Y, X, C)`` pixels -> ``(N, C, y, x)`` probabilities: a
        :class:`~segpipe.execution.predictor.Predictor`, or
        :func:`~segpipe.execution.predictor.window_probabilities` bound to a model.
    stitching
        Windows and sink (a :class:`Job` is one).
    level, batch_size
        The pyramid level read; windows per call of ``predict``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 window, got {batch_size}")
    # A pipeline stage on the CPU takes the cores in turn with this thread's work: each step
    # runs in a section of its own, never one that waits for the model (execution.pipeline).
    section: Callable[[], contextlib.AbstractContextManager[None]] = getattr(
        predict, "io_section", contextlib.nullcontext
    )
    with section():
        region = _bounds([t.box for t in tiles])
        windows = stitching.windows(tiles, region)
        source_box = _bounds([w.input for w in windows])
        pixels = read_mirrored(reader, source_box, level)
        _check_pixels(pixels, reader, source_box, level)
        sink = stitching.sink(region)
    chunks = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]

    def stacks() -> Iterator[np.ndarray]:
        for c in chunks:
            with section():
                stack = np.stack([pixels[w.input.relative_to(source_box)] for w in c])
            yield stack

    for chunk, probabilities in zip(chunks, _predicted(predict, stacks()), strict=True):
        with section():
            finite = np.isfinite(probabilities).reshape(len(chunk), -1).all(axis=1)
            if not finite.all():
                bad = chunk[int(np.argmin(finite))]
                raise PredictionError(
                    f"{reader.path}: the model's output is NaN or infinite for the window whose "
                    f"output is y {bad.output.y0}:{bad.output.y1}, x {bad.output.x0}:"
                    f"{bad.output.x1} of level {level}; nothing of this block was written"
                )
            for w, p in zip(chunk, probabilities, strict=True):
                h, wd = w.output.shape
                sink.add(w, p[:, w.crop : w.crop + h, w.crop : w.crop + wd])
    with section():
        return RegionPrediction(region, sink.result(), len(windows))


def _predicted(predict: WindowPredictor, stacks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """``predict`` over ``stacks`` in order; a pipeline stage (``submit``) gets the next batch
    before this one is stitched, so the model never waits for this thread."""
    submit = getattr(predict, "submit", None)
    if submit is None:
        yield from (np.asarray(predict(stack)) for stack in stacks)
        return
    ahead: deque[Future[np.ndarray]] = deque()
    for stack in stacks:
        ahead.append(submit(stack))
        if len(ahead) > 1:
            yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


class PredictionError(RuntimeError):
    """The model gave NaN or infinite probabilities; the message names the image and window."""


# segpipe's float pixel convention is [0, 1] (geometry.pixels.to_float01); a little slack for
# resampling overshoot, none for [0, 255] data stored as float.
_FLOAT_RANGE = (-0.01, 1.01)


def _check_pixels(pixels: np.ndarray, reader: Reader, box: Box, level: int) -> None:
    """Refuse float pixels that are NaN/inf or outside [0, 1], naming file and region."""
    if pixels.dtype.kind != "f":
        return
    where = f"y {box.y0}:{box.y1}, x {box.x0}:{box.x1} of level {level}"
    if not np.isfinite(pixels).all():
        raise ImageReadError(
            f"{reader.path}: NaN or infinite pixels at {where}; fill them (nodata) before "
            "segmenting"
        )
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < _FLOAT_RANGE[0] or hi > _FLOAT_RANGE[1]:
        raise ImageReadError(
            f"{reader.path}: float pixels must lie in [0, 1], found {lo:g}..{hi:g} at {where}; "
            "rescale them to [0, 1] or store integers (uint8/uint16)"
        )


def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    *,
    tile: int = 256,
    batch_size: int = 4,
    num_classes: int | None = None,
) -> np.ndarray:
    """Class probabilities ``(C, Y, X)`` float32 of a whole in-memory ``(Y, X, C)`` image.

    Exact overlap-tile mode through :func:`predict_region`, with the model as it is
    (:func:`~segpipe.execution.predictor.window_probabilities`: call ``model.eval()`` first
    for inference behaviour). ``tile`` is the output tile side in pixels, a multiple of the
    model's size multiple; ``num_classes`` defaults to ``model.num_classes``.
    """
    classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    if classes is None:
        raise ValueError(f"{type(model).__name__} has no num_classes attribute: pass num_classes=")
    reader = ArrayReader(image)
    tiles = list(tile_grid(reader.shape[:2], tile))
    stitching = Stitching("exact", tile, geometry_of(model), int(classes))
    predict = functools.partial(window_probabilities, model)
    return predict_region(tiles, reader, predict, stitching, batch_size=batch_size).probabilities


def predict_labels(
    model: nn.Module,
    image: np.ndarray,
    *,
    tile: int = 256,
    batch_size: int = 4,
    num_classes: int | None = None,
) -> np.ndarray:
    """Class map ``(Y, X)`` uint8 of a whole in-memory ``(Y, X, C)`` image: the argmax of
    :func:`predict_probabilities`, as the pipeline writes its mask."""
    probabilities = predict_probabilities(
        model, image, tile=tile, batch_size=batch_size, num_classes=num_classes
    )
    return class_map(probabilities)


def install_predictor(key: str, make: Callable[[], Predictor]) -> None:
    """Make ``make()`` the predictor tasks of run ``key`` use in this process.

    Built once per process: a second worker of the same process (a threaded cluster) only
    takes another hold on it, released by :func:`remove_predictor`.
    """
    with _REGISTRY_LOCK:
        predictor, holders = _PREDICTORS.get(key, (None, 0))
        _PREDICTORS[key] = (predictor or make(), holders + 1)


def remove_predictor(key: str) -> None:
    """Release one hold on run ``key``'s predictor; the last one frees its memory and stops
    its model thread."""
    stage = None
    with _REGISTRY_LOCK:
        predictor, holders = _PREDICTORS.get(key, (None, 0))
        if predictor is None or holders <= 1:
            _PREDICTORS.pop(key, None)
            _ARRAYS.pop(key, None)
            stage = _STAGES.pop(key, None)
        else:
            _PREDICTORS[key] = (predictor, holders - 1)
    if stage is not None:
        stage.close()


def stage_for(key: str) -> ModelStage:
    """The model thread of run ``key`` in this process, fed by every task of the run."""
    predictor = predictor_for(key)
    with _REGISTRY_LOCK:
        stage = _STAGES.get(key)
        if stage is None:
            stage = _STAGES[key] = ModelStage(predictor)
        return stage


def predictor_for(key: str) -> Predictor:
    """The predictor :func:`install_predictor` made ready for run ``key`` in this process."""
    try:
        return _PREDICTORS[key][0]
    except KeyError:
        raise RuntimeError(
            f"the model of run {key} is not loaded in this process (pid {os.getpid()}); "
            "segment registers it on every worker: was the worker started afterwards "
            "without the segpipe plugin?"
        ) from None


def segment_block(tiles: list[Tile], job: Job) -> BlockResult:
    """Predict, stitch and write one block of tiles; the unit of work of a Dask task.

    The calling thread reads and writes; the forward passes run on the process's model
    thread (:func:`stage_for`), batched with other tasks' windows. Exact-mode windows are as
    large as the device's memory allows, up to the whole block, unless the job sets them.
    """
    stage = stage_for(job.predictor_key)
    predictor = stage.predictor
    if job.mode == "exact" and job.exact_side is None:
        budget = predictor.memory_budget() / predictor.bytes_per_pixel()
        side = exact_side(_bounds([t.box for t in tiles]), job.tile, job.geometry, int(budget))
        job = dataclasses.replace(job, exact_side=side)
    block = predict_region(
        tiles,
        job.reader,
        stage,
        job,
        level=job.level,
        batch_size=predictor.config.batch_size,
    )
    # One write per block (a whole shard), in steps a forward pass may come between.
    arrays, step = _result_arrays(job), stage.io_section
    mask = write_block(job.output, block.region, block.probabilities, step=step, arrays=arrays)
    with stage.io_section():
        counts = [
            np.bincount(
                mask[t.box.relative_to(block.region)].ravel(), minlength=job.num_classes
            ).astype(np.int64)
            for t in tiles
        ]
    return BlockResult(tuple(t.index for t in tiles), tuple(counts), block.windows)


def _result_arrays(job: Job) -> list[tuple[zarr.Array, zarr.Array, zarr.Array]]:
    """The arrays each block of ``job``'s run writes, opened once per run in this process."""
    with _REGISTRY_LOCK:
        if job.predictor_key not in _ARRAYS:
            store = job.output if isinstance(job.output, URLPath) else os.fspath(job.output)
            _ARRAYS[job.predictor_key] = block_level_arrays(store)
        return _ARRAYS[job.predictor_key]
