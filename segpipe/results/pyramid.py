"""Result pyramids: levels 1.. computed from the level below.

Probabilities are averaged (:func:`segpipe.geometry.pixels.downsample_mean_2x`), the mask takes
the most frequent class of each 2x2 block (:func:`mode_2x`). Two builders:

* :func:`block_levels`, inside each task: its block halved level by level while the block's
  share of a level is whole shards (``layout.levels_in_blocks``), no second read of level 0;
  the probabilities are halved as the model gave them (float32) and encoded at each level;
* :func:`build_pyramid`, after the tasks: every further level from the one below it as stored
  (probabilities encoded), one whole shard at a time per thread, so no level is ever whole in
  memory.

Masks are the same whichever builds them; probabilities built in the tasks are a little closer
to the model's (one rounding to the stored dtype instead of one per level).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import zarr
from dask.system import CPU_COUNT

from segpipe.geometry.pixels import downsample_mean_2x
from segpipe.geometry.tiling import Box
from segpipe.progress import stage
from segpipe.results.encoding import as_float16, as_float32
from segpipe.results.labels import label_images
from segpipe.results.layout import levels_in_blocks
from segpipe.results.schema import LABEL_NAME, label_path, level_path, open_root, result_levels
from segpipe.results.shards import read_region, write_together


def mode_2x(labels: np.ndarray) -> np.ndarray:
    """Most frequent value of each 2x2 block of a (y, x) label array with even sides.

    Ties go to the block's top-left pixel when it is among the most frequent, else to the
    smaller value, so the result is deterministic. Labels under 16 (every shipped model's)
    are looked up: the four pixels of a block packed into 16 bits index a table of every
    block's mode, made once by the general rule; about 5x faster, the same values. Labels
    are uint8 (every label array a result holds): the scores below have room for 256 values.

    >>> mode_2x(np.array([[1, 2, 3, 3], [2, 1, 0, 3]], dtype=np.uint8))
    array([[1, 3]], dtype=uint8)
    """
    if labels.dtype != np.uint8:
        raise TypeError(f"mode_2x halves uint8 labels, got {labels.dtype}")
    corners = [labels[dy::2, dx::2][: labels.shape[0] // 2, : labels.shape[1] // 2]
               for dy in (0, 1) for dx in (0, 1)]  # fmt: skip
    if labels.dtype == np.uint8 and labels.size and int(labels.max()) < 16:
        code = corners[0].astype(np.uint16)
        for shift, corner in zip((4, 8, 12), corners[1:], strict=True):
            code |= corner.astype(np.uint16) << shift
        return _mode_table()[code]
    return _mode_of_corners(corners, labels.dtype)


@functools.cache
def _mode_table() -> np.ndarray:
    """The mode of every 2x2 block of values under 16, indexed by its four pixels' nibbles
    (top-left lowest): (65536,) uint8."""
    code = np.arange(1 << 16, dtype=np.uint16)
    corners = [((code >> shift) & 15).astype(np.uint8) for shift in (0, 4, 8, 12)]
    return _mode_of_corners(corners, np.dtype(np.uint8))


def _mode_of_corners(corners: list[np.ndarray], dtype: np.dtype[Any]) -> np.ndarray:
    """The mode of blocks given as their four pixels (top-left, top-right, bottom-left,
    bottom-right), each an array of one value per block."""
    # A pixel's score: how often its value occurs in its block (ties: the top-left pixel,
    # then the smaller value); the first best score wins. Four views, no (n, 4, 4) array.
    best, best_score = corners[0], None
    for i, value in enumerate(corners):
        count = sum((value == other).astype(np.int16) for other in corners)
        score = count * 512 - value.astype(np.int16) + (256 if i == 0 else 0)
        if best_score is None:
            best_score = score
            continue
        better = score > best_score
        best = np.where(better, value, best)
        best_score = np.where(better, score, best_score)
    return np.ascontiguousarray(best, dtype=dtype)


def block_levels(
    box: Box, values: np.ndarray, kind: str, levels: int
) -> Iterator[tuple[Box, np.ndarray]]:
    """``(box, values)`` of a block at level 0, then the same block at levels 1..``levels``,
    as far as :func:`box_levels` says it reaches.

    ``values`` is ``(…, y, x)`` over ``box`` (pixels of level 0), halved by ``kind``
    (``"mean"`` or ``"mode"``) at each level, its box with it. ``box`` must start on a
    multiple of ``2**levels`` (a block or tile, up to ``layout.levels_in_blocks``), so each
    level is that box's part of the whole level halved (odd last rows and columns dropped
    where the level's are).
    """
    for k in range(box_levels(box, levels) + 1):
        if k:
            values = halve(values, kind)
            box = Box(box.y0 // 2, box.y1 // 2, box.x0 // 2, box.x1 // 2)
        yield box, values


def box_levels(box: Box, levels: int) -> int:
    """How many of levels 1..``levels`` hold some of ``box`` (level-0 pixels, starting on a
    multiple of ``2**levels``): a last block 1-3 px high or wide (an image 1-3 px past a
    shard) has nothing left after a halving or two, and the whole level has no pixels there.

    >>> box_levels(Box(0, 1024, 0, 1024), 2), box_levels(Box(1024, 1027, 0, 1024), 2)
    (2, 1)
    """
    return min(levels, min(box.shape).bit_length() - 1)


KINDS = ("mean", "mode")


def halve(values: np.ndarray, kind: str) -> np.ndarray:
    """A ``(…, y, x)`` array halved: ``"mean"`` of each 2x2 block or its ``"mode"``; the
    mean of unsigned integers (uint8 probabilities as stored) rounded half to even."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'mean' or 'mode', got {kind!r}")
    if kind == "mean" and values.dtype.kind == "u":
        return _mean_2x_half_even(values)
    if kind == "mean" and values.dtype == np.float16:
        return _mean_2x_float16(values)
    if kind == "mean":
        # Probabilities: finite, in [0, 1], so a float32 sum is within 2 ulps, and every task
        # halves its block twice (7.0 ms in float64 for (3, 1024, 1024), 2.1 ms in float32).
        yx = (values.ndim - 2, values.ndim - 1)
        return downsample_mean_2x(values, yx_axes=yx, float32_sum=True)
    return mode_2x(values)


def _mean_2x_float16(values: np.ndarray) -> np.ndarray:
    """The 2x2 block mean of float16 ``(…, y, x)`` values (probabilities as stored), odd
    last rows and columns dropped, as ``pixels.downsample_mean_2x`` gives it bit for bit: the
    sum of four float16 exact in float64, rounded once. The casts are torch's
    (``encoding``): numpy's took 0.20 s of the 0.23 s a (3, 2048, 2048) level took to halve,
    in the pyramid pass that ends every run."""
    ny, nx = values.shape[-2] // 2 * 2, values.shape[-1] // 2 * 2
    wide = as_float32(values[..., :ny, :nx])
    summed = wide[..., 0::2, 0::2].astype(np.float64)
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        summed += wide[..., dy::2, dx::2]
    summed *= 0.25  # exact: a power of two
    return as_float16(summed)


def _mean_2x_half_even(values: np.ndarray) -> np.ndarray:
    """The 2x2 block mean of unsigned ``(…, y, x)`` values, odd last rows and columns dropped,
    rounded half to even. Half up (``pixels.downsample_mean_2x``, as images are) would add 1/8
    of a step a level on average, every level built from the one below as stored: uint8
    probabilities drifted +0.6/255 by level 6, their class sums to 259/255.

    >>> _mean_2x_half_even(np.array([[0, 1, 1, 2, 2, 3, 9], [1, 0, 1, 2, 2, 3, 9]], np.uint8))
    array([[0, 2, 2]], dtype=uint8)
    """
    ny, nx = values.shape[-2] // 2 * 2, values.shape[-1] // 2 * 2
    wide = np.dtype(np.uint16 if values.dtype.itemsize == 1 else np.uint64)
    summed: npt.NDArray[np.unsignedinteger[Any]] = values[..., 0:ny:2, 0:nx:2].astype(wide)
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        summed += values[..., dy:ny:2, dx:nx:2]
    # round(s / 4), ties to the even quotient: add 1, and 1 more where s // 4 is odd
    summed += 1 + ((summed >> 2) & 1)
    return (summed >> 2).astype(values.dtype)


def build_pyramid(
    path: str | os.PathLike,
    *,
    threads: int | None = None,
    fence: Callable[[], None] | None = None,
) -> None:
    """Compute the levels of the result at ``path`` its tasks did not write, shard by shard.

    Levels above ``layout.levels_in_blocks`` (every level above 0 in results of layouts 1-2),
    each from the one just written: for every shard of the level, the 2x larger region below
    is read back (bounded memory, ``threads`` shards at a time, default one per core),
    probabilities halved by 2x2 mean as stored, the mask and every other label image by 2x2
    mode, and the shards written in one trip
    (:func:`segpipe.results.shards.write_together`). Announced as the stage ``"pyramid"``
    (:mod:`segpipe.progress`), one unit per level, when there is one. ``fence`` runs before
    each level is read and each shard stored (``finalize_result``'s check that no other run
    has replaced the result since: a result at a URL takes no lock).
    """
    root, meta = open_root(path, "r+")
    layout = meta.layout

    def array(name: str) -> zarr.Array:
        node = root[name]
        if not isinstance(node, zarr.Array):
            raise TypeError(f"{path}/{name} is not a Zarr array: not a segpipe result layout")
        return node

    def level(k: int, name: str) -> zarr.Array:
        return array(level_path(k, name, layout=layout))

    def label(name: str, k: int) -> zarr.Array:
        return array(label_path(name, k, layout=layout))

    n_levels = len(result_levels(path))
    first = levels_in_blocks(meta) + 1
    if first >= n_levels:  # the tasks wrote every level
        return
    # The mask's label image repeats the level's mask: it gets the same reduction.
    others = [name for name in label_images(path) if name != LABEL_NAME]
    # Dask's count, as its threaded scheduler built the pyramid before: it honours the
    # process's CPU affinity and cgroup limits, where os.cpu_count() gives the host's.
    pool = ThreadPoolExecutor(threads or CPU_COUNT, "segpipe-pyramid")
    with pool, stage("pyramid", total=n_levels - first, unit="level") as progress:
        for k in range(first, n_levels):
            if fence is not None:
                fence()
            # (source at level k - 1, kind, targets at level k): the mask's label image gets
            # the mask's values, encoded once.
            groups = [
                (level(k - 1, "mask"), "mode", [level(k, "mask"), label(LABEL_NAME, k)]),
                (level(k - 1, "probabilities"), "mean", [level(k, "probabilities")]),
                *((label(n, k - 1), "mode", [label(n, k)]) for n in others),
            ]
            shard = cast(tuple[int, ...], level(k, "mask").shards or level(k, "mask").chunks)
            boxes = shard_boxes(level(k, "mask").shape, shard[-2:])
            # Each array's shards apart: the few shards of a slide's upper levels still keep
            # every thread busy.
            units = [(group, box) for box in boxes for group in groups]
            try:
                list(pool.map(lambda u: _halve_into(u[0], u[1], fence), units))
            except BaseException:  # the first failure, without waiting for the queued units
                pool.shutdown(cancel_futures=True)
                raise
            progress.advance()


def shard_boxes(shape: tuple[int, ...], shard: tuple[int, ...]) -> list[Box]:
    """The shards of a ``(…, y, x)`` level as boxes of its pixels, row-major."""
    ny, nx = shape[-2:]
    sy, sx = shard
    return [
        Box(y, min(y + sy, ny), x, min(x + sx, nx))
        for y in range(0, ny, sy)
        for x in range(0, nx, sx)
    ]


def _halve_into(
    group: tuple[zarr.Array, str, list[zarr.Array]], box: Box, fence: Callable[[], None] | None
) -> None:
    """Write ``box`` of each target of ``group`` (``source, kind, targets``): the source's 2x
    larger region below, halved by ``kind``; ``fence`` just before the shards are stored."""
    source, kind, targets = group
    lead = (slice(None),) * (source.ndim - 2)
    below = Box(2 * box.y0, 2 * box.y1, 2 * box.x0, 2 * box.x1)
    try:
        values = halve(read_region(source, (*lead, *below.slices)), kind)
    except Exception:
        if fence is not None:
            fence()  # another run's result, read in this one's format: say so, not a checksum
        raise
    write_together([(t, (*lead, *box.slices), values) for t in targets], before_storing=fence)
