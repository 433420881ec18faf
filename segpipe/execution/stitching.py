"""The overlap-tile stitcher: the one place windows are cut, predicted and joined.

:func:`predict_parts` takes the tiles of a region (and, where a foreground mask chose them,
the boxes of them to compute), reads the input their windows need once (mirrored at the image
border), runs a :data:`~segpipe.execution.predictor.WindowPredictor` on the windows in batches,
joins the outputs through a sink (exact or blend, :class:`Stitching`) and gives each part of
the region as soon as its windows are joined. Its callers are a Dask task
(:func:`segpipe.execution.tasks.segment_block`, a part per shard block) and, through
:func:`predict_region` (one part, the region), :func:`predict_labels`: a whole in-memory image
predicted by a model as it is, for training validation, evaluation and benchmarks.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from torch import nn

from segpipe.execution.inputs import model_pixels
from segpipe.execution.pipeline import StageClosed
from segpipe.execution.predictor import WindowPredictor, window_probabilities
from segpipe.geometry.blending import BlendLattice, BlendSink, CropSink, Sink, blend_windows
from segpipe.geometry.tiling import Box, Geometry, Tile, Window, exact_windows, tile_grid
from segpipe.io.readers import ArrayReader, ImageReadError, Reader, read_mirrored
from segpipe.models import PixelContract, geometry_of, pixel_contract_of
from segpipe.results import class_map

__all__ = [
    "MODES",
    "PredictionError",
    "RegionPrediction",
    "Stitching",
    "bounds",
    "model_errors",
    "overlap_groups",
    "predict_labels",
    "predict_parts",
    "predict_probabilities",
    "predict_region",
]

MODES = ("exact", "blend")
_Guard = contextlib.AbstractContextManager[None]


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
            raise ValueError("blend mode needs a lattice (segpipe.geometry.blending.blend_lattice)")

    def windows(
        self, tiles: Sequence[Tile], region: Box, boxes: Sequence[Box] | None = None
    ) -> list[Window]:
        """The windows that give ``tiles`` (whose bounding box is ``region``), row-major; in
        exact mode with ``boxes``, those that give the boxes (each cut in steps of
        ``exact_side``), box by box."""
        if self.mode == "blend" and self.lattice is not None:  # blend always has one
            windows = blend_windows(self.lattice, region)
        elif boxes is not None:
            side = self.exact_side or self.tile
            return [w for b in boxes for w in exact_windows(b, side, self.geometry)]
        else:
            windows = exact_windows(region, self.exact_side or self.tile, self.geometry)
        return [w for w in windows if any(w.output.intersect(t.box) for t in tiles)]

    def sink(self, region: Box, computed: np.ndarray | None = None) -> Sink:
        """An empty sink for ``region`` that joins window outputs as the mode says; with
        ``computed`` (``region``'s shape, bool) only those pixels are kept, the rest are 0."""
        if self.mode == "exact":
            return CropSink(region, self.num_classes, computed)
        return BlendSink(region, self.num_classes, sigma_scale=self.sigma_scale, computed=computed)


@dataclass(frozen=True)
class RegionPrediction:
    """What :func:`predict_region` gives: ``probabilities`` ``(C, y, x)`` float32 over
    ``region`` (pixels of the level read) and the number of windows predicted."""

    region: Box
    probabilities: np.ndarray
    windows: int


def bounds(boxes: Sequence[Box]) -> Box:
    """The bounding box of ``boxes``."""
    return Box(
        min(b.y0 for b in boxes),
        max(b.y1 for b in boxes),
        min(b.x0 for b in boxes),
        max(b.x1 for b in boxes),
    )


def overlap_groups(boxes: Sequence[Box]) -> list[tuple[Box, list[int]]]:
    """The indices of ``boxes`` in groups, each with the bounds of its boxes, no two groups'
    bounds overlapping: what one read covers, so that a task's scattered foreground is read
    without the glass between its parts.

    >>> overlap_groups([Box(0, 4, 0, 4), Box(2, 6, 2, 6), Box(0, 2, 10, 12)])
    [(Box(y0=0, y1=6, x0=0, x1=6), [0, 1]), (Box(y0=0, y1=2, x0=10, x1=12), [2])]
    """
    groups: list[tuple[Box, list[int]]] = []
    for n, box in enumerate(boxes):
        members = [n]
        merged = True
        while merged:  # a grown box may now overlap groups it missed
            merged, kept = False, []
            for other, theirs in groups:
                if other.intersect(box) is not None:
                    box, members, merged = bounds([box, other]), theirs + members, True
                else:
                    kept.append((other, theirs))
            groups = kept
        groups.append((box, sorted(members)))
    return sorted(groups, key=lambda g: g[1][0])


def predict_region(
    tiles: Sequence[Tile],
    reader: Reader,
    predict: WindowPredictor,
    stitching: Stitching,
    *,
    level: int = 0,
    batch_size: int = 4,
    boxes: Sequence[Box] | None = None,
    contract: PixelContract | None = None,
) -> RegionPrediction:
    """Predict ``tiles`` of ``reader``'s ``level`` and stitch them: the overlap-tile stitcher.

    The input all windows need is read once (mirrored where it leaves the image, as in the
    U-Net paper); windows go to ``predict`` ``batch_size`` at a time, those of one input shape
    together (in the order each shape first appears, row-major within it), and each output,
    cropped by ``Window.crop``, into the stitching's sink. In exact mode and for a
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
    boxes
        Exact mode only: the boxes of the tiles to compute (level pixels, on the pooling
        phase), where a foreground mask chose them; the region's other pixels are 0 (not
        computed). By default every pixel of ``tiles``.
    contract
        The model's pixel contract (``models.pixel_contract_of``): float pixels must lie in
        [0, 1] only under the dtype rule (None, or ``scaling="dtype"``); a contract that
        scales from its own range takes them as they are.
    """
    (whole,) = predict_parts(
        tiles,
        reader,
        predict,
        stitching,
        level=level,
        batch_size=batch_size,
        boxes=boxes,
        contract=contract,
    )
    return whole


def predict_parts(
    tiles: Sequence[Tile],
    reader: Reader,
    predict: WindowPredictor,
    stitching: Stitching,
    *,
    parts: Sequence[Box] | None = None,
    level: int = 0,
    batch_size: int = 4,
    boxes: Sequence[Box] | None = None,
    channels: int | None = None,
    contract: PixelContract | None = None,
) -> Iterator[RegionPrediction]:
    """:func:`predict_region`, giving each of ``parts`` (boxes of the region; default the
    whole region) as soon as every window over it is stitched, while later windows are
    predicted: a task writes its first shards while the model works on its last (each
    prediction's ``windows`` counts the whole call's). ``channels``: the leading channels of
    the pixels the model takes (None: all; an RGB model leaves an RGBA image's alpha out)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 window, got {batch_size}")
    if boxes is not None and stitching.mode != "exact":
        raise ValueError("boxes are for exact mode: a blend window left out changes its neighbours")
    # A pipeline stage on the CPU takes the cores in turn with this thread's work: each step
    # runs in a section of its own, never one that waits for the model (execution.pipeline).
    section: Callable[[], contextlib.AbstractContextManager[None]] = getattr(
        predict, "io_section", contextlib.nullcontext
    )
    with section():
        region = bounds([t.box for t in tiles])
        windows = stitching.windows(tiles, region, boxes)
        # Read per group of overlapping windows: one read of their bounds (a halo read once
        # for neighbours), none of the glass between a task's scattered foreground.
        groups = overlap_groups([w.input for w in windows])
        group_of = {n: g for g, (_, members) in enumerate(groups) for n in members}
        sources = []
        for box, _ in groups:  # no name left holding a read: sources.clear() frees them all
            read = read_mirrored(reader, box, level)
            sources.append(model_pixels(read, reader, box, level, contract, channels))
            del read
        sink = stitching.sink(region, _computed(region, boxes or [t.box for t in tiles]))
    parts = list(parts or [region])
    # Windows still to come over each part (by the window's index): a part is given when its
    # count reaches 0.
    over = [[i for i, p in enumerate(parts) if w.output.intersect(p)] for w in windows]
    remaining = [sum(i in touched for touched in over) for i in range(len(parts))]
    # Batches of one window shape (a region's cut last windows and boxes' windows differ).
    # Exact windows agree where they overlap (to float rounding), and blend windows share one
    # shape, so the order changes no value beyond rounding.
    by_shape: dict[tuple[int, int], list[int]] = {}
    for n, w in enumerate(windows):
        by_shape.setdefault(w.input.shape, []).append(n)
    chunks = [
        group[i : i + batch_size]
        for group in by_shape.values()
        for i in range(0, len(group), batch_size)
    ]

    def stacks() -> Iterator[np.ndarray]:
        for k, c in enumerate(chunks):
            with section():
                stack = np.stack(
                    [
                        sources[group_of[n]][windows[n].input.relative_to(groups[group_of[n]][0])]
                        for n in c
                    ]
                )
                if k == len(chunks) - 1:
                    sources.clear()  # let go once the last window is cut: parts come after
            yield stack

    def failed_on(k: int) -> _Guard:
        b, n = bounds([windows[i].output for i in chunks[k]]), len(chunks[k])
        which = "the window whose output is" if n == 1 else f"the {n} windows in"
        return model_errors(
            reader.path, f"{which} y {b.y0}:{b.y1}, x {b.x0}:{b.x1} of level {level}"
        )

    def stitched(i: int) -> RegionPrediction:
        with section():
            return RegionPrediction(parts[i], sink.result(parts[i]), len(windows))

    given = set()
    for chunk, probabilities in zip(chunks, _predicted(predict, stacks(), failed_on), strict=True):
        with section():
            finite = np.isfinite(probabilities).reshape(len(chunk), -1).all(axis=1)
            if not finite.all():
                bad = windows[chunk[int(np.argmin(finite))]]
                raise PredictionError(
                    f"{reader.path}: the model's output is NaN or infinite for the window whose "
                    f"output is y {bad.output.y0}:{bad.output.y1}, x {bad.output.x0}:"
                    f"{bad.output.x1} of level {level}; no tile of this block is recorded done"
                )
            done = []
            for n, p in zip(chunk, probabilities, strict=True):
                w = windows[n]
                h, wd = w.output.shape
                sink.add(w, p[:, w.crop : w.crop + h, w.crop : w.crop + wd])
                for i in over[n]:
                    remaining[i] -= 1
                    done += [i] if remaining[i] == 0 else []
        for i in done:
            given.add(i)
            yield stitched(i)
    for i in range(len(parts)):
        if i not in given:  # no window over it: the sink says what is missing
            yield stitched(i)


def _computed(region: Box, areas: Sequence[Box]) -> np.ndarray | None:
    """``region``'s pixels inside ``areas`` (disjoint boxes), or None when that is all."""
    if sum(a.shape[0] * a.shape[1] for a in areas) == region.shape[0] * region.shape[1]:
        return None
    computed = np.zeros(region.shape, dtype=bool)
    for a in areas:
        computed[a.relative_to(region)] = True
    return computed


def _predicted(
    predict: WindowPredictor, stacks: Iterator[np.ndarray], errors: Callable[[int], _Guard]
) -> Iterator[np.ndarray]:
    """``predict`` over ``stacks`` in order, the model's errors on the ``k``-th raised within
    ``errors(k)``; a pipeline stage (``submit``) gets the next batch before this one is
    stitched, so the model never waits for this thread."""
    submit = getattr(predict, "submit", None)
    if submit is None:
        for k, stack in enumerate(stacks):
            with errors(k):
                probabilities = np.asarray(predict(stack))
            yield probabilities
        return
    ahead: deque[tuple[int, Future[np.ndarray]]] = deque()

    def result() -> np.ndarray:
        k, future = ahead.popleft()
        with errors(k):  # a failed pass fails every chunk in it (pipeline._fail)
            return future.result()

    for k, stack in enumerate(stacks):
        with errors(k):  # a shape's first stack probes the model's memory (pass_plan)
            ahead.append((k, submit(stack)))
        if len(ahead) > 1:
            yield result()
    while ahead:
        yield result()


@contextlib.contextmanager
def model_errors(path: str, what: str) -> Iterator[None]:
    """An error of the model's (a kernel's, a shape's, memory at one window) raised as a
    :class:`PredictionError` naming ``path`` and ``what`` it ran on; the pipeline's own
    (PredictionError, ImageReadError, StageClosed) and BaseExceptions pass as they are."""
    try:
        yield
    except (PredictionError, ImageReadError, StageClosed):
        raise
    except Exception as err:
        failure = f"the model failed on {what}: {type(err).__name__}: {err}"
        raise PredictionError(f"{path}: {failure}") from err


class PredictionError(RuntimeError):
    """The model failed on windows or gave NaN/inf probabilities; names image and windows."""


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
    contract = pixel_contract_of(model)
    return predict_region(
        tiles, reader, predict, stitching, batch_size=batch_size, contract=contract
    ).probabilities


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
