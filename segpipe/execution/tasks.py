"""Running segmentation tasks on Dask: clusters, per-worker models, one task per tile block.

A task takes a block of output tiles (``task_tiles`` x ``task_tiles``, one Zarr shard), reads the
input it needs once, runs the worker's model on its windows in batches, stitches them through a
sink, writes the block to the result and returns the block's per-tile class counts. Tasks carry
paths and geometry, never pixel arrays, so the graph stays small for any image size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from segpipe.execution.predictor import Predictor
from segpipe.geometry.blending import BlendSink, CropSink, Sink
from segpipe.geometry.tiling import (
    BlendLattice,
    Box,
    Geometry,
    Tile,
    Window,
    blend_windows,
    exact_window,
)
from segpipe.io.readers import Reader, read_mirrored
from segpipe.results import write_block

__all__ = [
    "BlockResult",
    "Job",
    "install_predictor",
    "predictor_for",
    "remove_predictor",
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


def install_predictor(key: str, predictor: Predictor) -> None:
    """Make ``predictor`` the one tasks of model ``key`` use in this process."""
    _PREDICTORS[key] = predictor


def remove_predictor(key: str) -> None:
    """Forget model ``key`` in this process (a worker gets its memory back)."""
    _PREDICTORS.pop(key, None)


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
