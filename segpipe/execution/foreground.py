"""Which tiles a run computes: a foreground mask of the image at low resolution, and its tiles.

``SegmentConfig.foreground`` says where the mask comes from:

* ``"tissue"``: stained tissue of a brightfield slide, found on a small image of the whole
  scan (:func:`segpipe.geometry.tissue.tissue_mask`);
* ``"nodata"``: the valid pixels of a raster that declares nodata, a mask band or alpha;
* a file (its sha256 part of the result's identity): GeoJSON polygons in level-0 pixels, x
  right, y down (QuPath's convention, :mod:`segpipe.analysis.vectors`'s ``coords="pixel"``),
  or a mask image of the image's aspect ratio, stretched over it: foreground where its alpha
  (the channel named ``"alpha"``, else the last of LA or RGBA) is nonzero if not constant,
  else where any other channel is;
* ``"none"``: every tile;
* ``"auto"`` (the default): ``"tissue"`` for an RGB(A) uint8 image with a pixel size, not
  georeferenced (a slide), else ``"nodata"`` for an image that declares nodata, else
  ``"none"``. :func:`resolve_foreground` settles it before the result's identity is taken.

The mask has 1-2 times :data:`MASK_SIDE` cells along its longer side. Tissue is found on the
coarsest pyramid level at least that, block-averaged; nodata and mask images are read whole,
in strips, and OR-pooled into the cells (:func:`~segpipe.geometry.foreground.pool_mask`), as
a nearest-neighbour overview drops thin strips. In exact mode each task's block computes
boxes of small cells around its foreground (:func:`choose_boxes`): the foreground's bounding
box, cut in two where the halves' windows cost fewer pixels, again and again; a tile is
computed when a box touches it, and its pixels outside the boxes are left out like glass.
In blend mode a tile is computed when it holds a foreground pixel. A tile left out is never
read or predicted: it is recorded done with all its pixels in class 0 (the shipped models'
``background``; for another model, whatever its class 0 is), and its mask and probabilities
keep the store's fill value, 0: a computed pixel's probabilities sum to one, a left-out
pixel's to zero. The mask itself is stored with the result as the label image
:data:`FOREGROUND_LABEL` (1: foreground), so a reader can tell tissue area from glass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, cast

import dask.array as da
import numpy as np

from segpipe.execution.stitching import bounds
from segpipe.execution.tasks import Block
from segpipe.geometry.foreground import (
    MaskPatch,
    cover_boxes,
    foreground_pixels,
    pool_mask,
    tiles_touching,
)
from segpipe.geometry.tiling import Box, Geometry, TileGrid
from segpipe.geometry.tissue import block_mean, tissue_mask
from segpipe.io.files import URLPath, location
from segpipe.io.maskfiles import mask_file_sha256, read_mask_file, row_strips
from segpipe.io.readers import Reader
from segpipe.progress import stage
from segpipe.results import FOREGROUND_LABEL, mark_tiles_done
from segpipe.results.labels import add_label_image
from segpipe.results.tiles import check_not_replaced

__all__ = [
    "FOREGROUND_LABEL",
    "FOREGROUND_MODES",
    "MASK_SIDE",
    "Foreground",
    "TileSelection",
    "cell_side",
    "choose_boxes",
    "compute_foreground",
    "foreground_of",
    "low_resolution",
    "mask_file_sha256",
    "read_mask_file",
    "resolve_foreground",
    "select_tiles",
    "valid_low_resolution",
]

FOREGROUND_MODES = ("auto", "tissue", "nodata", "none")
FOREGROUND_MEANINGS = ("outside", "foreground")
# The mask's longer side, pixels: fine enough that a 512 px tile of a 100k px slide is several
# mask pixels, small enough to hold and clean in memory in well under a second.
MASK_SIDE = 1024


@dataclass(frozen=True)
class Foreground:
    """A foreground mask over a whole level of ``shape`` (y, x) pixels.

    ``mask`` is ``(my, mx)`` bool at low resolution; level pixel ``(y, x)`` takes mask pixel
    ``(y * my // ny, x * mx // nx)`` (:func:`segpipe.geometry.foreground.upsample_mask`).
    ``kind`` says where it came from: ``"tissue"``, ``"nodata"`` or ``"file"``.
    """

    kind: str
    mask: np.ndarray
    shape: tuple[int, int]

    @property
    def pixels(self) -> int:
        """Foreground pixels of the level."""
        return foreground_pixels(self.mask, self.shape)

    def tiles(self, tile: int) -> np.ndarray:
        """``(tile_y, tile_x)`` bool: the tiles of ``tile`` pixels holding foreground."""
        return tiles_touching(self.mask, self.shape, tile)

    def patch(self, box: Box) -> MaskPatch:
        """The mask's cells over the level's ``box``: what a task carries to write its block."""
        return MaskPatch.of(self.mask, self.shape, box)


@dataclass(frozen=True)
class TileSelection:
    """The tiles a run computes (``computed``, ``(tile_y, tile_x)`` bool), the mask that
    chose them (None: every tile), and in exact mode the boxes each block computes of them
    (``boxes``, by the block's first tile; a block not named computes its tiles whole)."""

    computed: np.ndarray
    foreground: Foreground | None = None
    boxes: dict[tuple[int, int], tuple[Box, ...]] = field(default_factory=dict)

    @property
    def background(self) -> int:
        """Tiles not computed: no foreground, recorded as class 0."""
        return int(self.computed.size - np.count_nonzero(self.computed))

    @property
    def foreground_pixels(self) -> int | None:
        return None if self.foreground is None else self.foreground.pixels

    def blocks(self, grid: TileGrid, side: int) -> list[Block]:
        """:meth:`TileGrid.blocks` with only the computed tiles, the boxes of them each
        computes and the mask's cells over them; blocks left empty dropped."""
        blocks = []
        for b in grid.blocks(side):
            kept = tuple(t for t in b if self.computed[t.index])
            if not kept:
                continue
            patch = None
            if self.foreground is not None:  # over the whole shard block: it is written whole
                patch = (self.foreground.patch(bounds([t.box for t in b])),)
            blocks.append(Block((kept,), self.boxes.get(b[0].index), patch))
        return blocks


def resolve_foreground(setting: str, reader: Reader) -> str:
    """What ``"auto"`` means for ``reader`` (``"tissue"``, ``"nodata"`` or ``"none"``); any
    other mode as it is, ``"tissue"`` checked to have colour to go by; a mask file's path,
    checked to exist."""
    if setting == "tissue" and (channels := reader.level_shapes[0][2]) < 3:
        raise ValueError(
            f"{reader.path}: foreground='tissue' finds stained tissue by its colour "
            f"(saturation of RGB), and the image has {channels} channel(s); use "
            "foreground='none', or 'nodata' where the image marks its empty areas"
        )
    if setting in FOREGROUND_MODES[1:]:
        return setting
    if setting == "auto":
        # A slide before nodata: OpenSlide marks a scanner's empty space by alpha, and tissue
        # detection leaves that out (black has no saturation) as it leaves out glass.
        if _is_brightfield(reader):
            return "tissue"
        return "nodata" if _declares_nodata(reader) else "none"
    where = location(setting)  # a file:// URL is the local file it names
    if isinstance(where, URLPath) or not where.exists():
        raise FileNotFoundError(
            f"foreground mask {setting!r} does not exist (mask files are local); foreground "
            f"must be one of {', '.join(FOREGROUND_MODES)} or a mask image / GeoJSON file"
        )
    return os.path.abspath(where)  # stored with the result: found from any folder


def _is_brightfield(reader: Reader) -> bool:
    # A slide: RGB uint8 (an alpha after it allowed) with a physical pixel size, not
    # georeferenced. Fluorescence (uint16, many channels) and aerial images (no microns)
    # are not told apart from their own empty areas this way.
    names = tuple(getattr(reader, "channel_names", None) or ())
    channels = reader.level_shapes[0][2]
    return (
        reader.pixel_size_um is not None
        and (channels == 3 or (channels == 4 and names[3:] == ("alpha",)))
        and np.dtype(reader.dtype) == np.uint8
        and getattr(reader, "georeference", None) is None
    )


def _declares_nodata(reader: Reader) -> bool:
    # Readers of formats with nodata, mask bands or alpha say which (``mask_kind``).
    return getattr(reader, "mask_kind", None) is not None and callable(
        getattr(reader, "valid_mask", None)
    )


def _mask_level(reader: Reader, level: int) -> int:
    """The coarsest level from ``level`` on with a longer side >= MASK_SIDE, else ``level``."""
    sides = [max(s[:2]) for s in reader.level_shapes]
    return max((k for k in range(level, len(sides)) if sides[k] >= MASK_SIDE), default=level)


def low_resolution(reader: Reader, level: int) -> np.ndarray:
    """A small ``(y, x, C)`` float32 image of the whole of ``level``: the coarsest pyramid
    level with a longer side of at least :data:`MASK_SIDE`, block-averaged to at most about
    twice that (an image without a pyramid is read whole, a chunk at a time)."""
    if not hasattr(reader, "level"):  # a duck-typed reader (arguments.py): it failed raw
        raise TypeError(
            f"{reader.path}: a foreground mask reads the image's level(k), which its reader "
            f"({type(reader).__name__}) lacks: give it one, or segment with foreground='none'"
        )
    k = _mask_level(reader, level)
    arr = reader.level(k)
    f = max(1, max(arr.shape[:2]) // MASK_SIDE)
    if f == 1:
        return np.asarray(arr.compute(scheduler="threads"), dtype=np.float32)
    arr = arr.rechunk({0: max(f, arr.chunksize[0] // f * f), 1: max(f, arr.chunksize[1] // f * f)})
    chunks = tuple(tuple(-(-c // f) for c in cs) for cs in arr.chunks[:2]) + arr.chunks[2:]
    small = da.map_blocks(block_mean, arr, f, chunks=chunks, dtype=np.float32)
    return np.asarray(small.compute(scheduler="threads"))


def valid_low_resolution(reader: Reader, level: int) -> np.ndarray:
    """``(my, mx)`` bool over the whole of ``level`` (1-2 times :data:`MASK_SIDE`): True
    where a cell holds any valid pixel (``reader.valid_mask``) of the level itself."""
    ny, nx = reader.level_shapes[level][:2]
    out = np.zeros(_mask_shape((ny, nx)), dtype=bool)
    valid_mask = cast(Any, reader).valid_mask  # BaseReader has it; the protocol does not
    for y0, y1 in row_strips(reader, level):
        strip = valid_mask(y0, y1, 0, nx, level)
        if strip is None:  # the file marks no pixel invalid
            return np.ones_like(out)
        pool_mask(out, strip, (ny, nx), y0)
    return out


def _mask_shape(shape: tuple[int, int]) -> tuple[int, int]:
    f = max(1, max(shape) // MASK_SIDE)
    return (-(-shape[0] // f), -(-shape[1] // f))


def compute_foreground(reader: Reader, level: int, mode: str) -> Foreground | None:
    """The foreground of ``reader``'s ``level`` for a resolved ``mode`` (None for ``"none"``)."""
    shape = (int(reader.level_shapes[level][0]), int(reader.level_shapes[level][1]))
    if mode == "none":
        return None
    if mode == "tissue":
        small = low_resolution(reader, level)
        tissue = tissue_mask(small, sizes_at=MASK_SIDE)
        if _declares_nodata(reader):
            # Transparent pixels may keep their colour (unassociated alpha): not tissue. Both
            # masks are cells of the same mask level, the same shape.
            tissue &= valid_low_resolution(reader, _mask_level(reader, level))
        return Foreground("tissue", tissue, shape)
    if mode == "nodata":
        if not _declares_nodata(reader):
            raise ValueError(
                f"{reader.path} declares no nodata value, mask band or alpha channel: "
                "foreground='nodata' has nothing to go by; use 'none' or a mask file"
            )
        return Foreground("nodata", valid_low_resolution(reader, level), shape)
    return Foreground("file", read_mask_file(mode, reader, _mask_shape(shape), level), shape)


def foreground_of(reader: Reader, level: int, mode: str) -> Foreground | None:
    """:func:`compute_foreground` as a run's stage ``"tissue mask"``. A run calls it before
    it makes its result: a mask file that cannot be read, or nodata the image does not
    declare, leaves nothing at the output (a result skeleton there, whose identity holds the
    bad file's hash, refused the corrected run as another result)."""
    if mode == "none":  # no stage to announce
        return None
    with stage("tissue mask", total=1, unit="mask") as progress:
        foreground = compute_foreground(reader, level, mode)
        progress.advance()
    return foreground


def select_tiles(
    grid: TileGrid,
    output: str | os.PathLike,
    foreground: Foreground | None,
    *,
    task_tiles: int,
    num_classes: int,
    geometry: Geometry | None = None,
    done: np.ndarray | None = None,
    started: str | None = None,
) -> TileSelection:
    """Choose the tiles to compute from the run's ``foreground`` (:func:`foreground_of`;
    None: every tile), and record the others in the result at ``output`` as done, all
    class 0.

    With the model's ``geometry`` (exact
    mode), each block computes only boxes of cells around its foreground
    (:func:`choose_boxes`), and the tiles those boxes touch are the computed ones; else (blend
    mode) every tile the foreground touches is computed whole. Called on every run, resumed or
    not: the mask is a function of the image, so a resumed run chooses the same tiles. Tiles
    ``done`` (``(tile_y, tile_x)`` bool) keep their record: a result begun by an older
    release, which chose tiles otherwise, keeps the counts of what it wrote, and its blocks
    done keep the foreground label image that release wrote (each task writes its own block
    of it; a release that made the mask otherwise would leave the two mixed). ``started``: the
    stamp of the result the run prepared, which the record checks it is still writing into
    (:func:`~segpipe.results.tiles.check_not_replaced`).
    """
    if foreground is None:
        return TileSelection(np.ones(grid.grid_shape, dtype=bool))
    if geometry is None:
        selection = TileSelection(foreground.tiles(grid.tile), foreground)
    else:
        selection = choose_boxes(foreground, grid, task_tiles, geometry)
    background = {}
    left_out = ~selection.computed if done is None else ~selection.computed & ~done
    for iy, ix in zip(*np.nonzero(left_out), strict=True):
        tile = grid[int(iy), int(ix)]
        counts = np.zeros(num_classes, dtype=np.int64)
        counts[0] = tile.box.shape[0] * tile.box.shape[1]
        background[tile.index] = counts
    mark_tiles_done(output, background, started=started)
    if started is not None:  # the label image is made in the run's result, not another's
        check_not_replaced(output, started)
    _add_foreground_label(output, foreground)
    return selection


# Cells at least this many pixels a side: boxes snap to them, so a run's windows come in few
# shapes (a new shape cost the shipped model 7-33 ms of set-up on its first CPU pass).
MIN_CELL = 64


def cell_side(tile: int, multiple: int, level_px_per_mask_px: float) -> int:
    """The side of the cells boxes are made of: the smallest divisor of ``tile`` that is a
    multiple of the model's ``multiple`` and at least :data:`MIN_CELL` and one mask pixel.

    >>> cell_side(512, 8, 8.0), cell_side(512, 8, 98.0), cell_side(96, 32, 1.0)
    (64, 128, 96)
    """
    least = max(MIN_CELL, math.ceil(level_px_per_mask_px))
    return next((d for d in range(multiple, tile, multiple) if tile % d == 0 and d >= least), tile)


def choose_boxes(
    foreground: Foreground, grid: TileGrid, task_tiles: int, geometry: Geometry
) -> TileSelection:
    """In each block of ``task_tiles`` x ``task_tiles`` tiles, the boxes of cells
    (:func:`cell_side`) around its foreground that cost the fewest window pixels
    (:func:`~segpipe.geometry.foreground.cover_boxes`); the tiles they touch are computed."""
    ny, nx = foreground.shape
    ratio = max(ny / foreground.mask.shape[0], nx / foreground.mask.shape[1])
    cell = cell_side(grid.tile, geometry.multiple, ratio)
    cells = foreground.tiles(cell)
    computed = np.zeros(grid.grid_shape, dtype=bool)
    boxes = {}
    for block in grid.blocks(task_tiles):
        region = bounds([t.box for t in block])
        part = cells[
            region.y0 // cell : -(-region.y1 // cell), region.x0 // cell : -(-region.x1 // cell)
        ]
        if not part.any():
            continue
        chosen = tuple(cover_boxes(part, cell, region, geometry.halo))
        boxes[block[0].index] = chosen
        for t in block:
            computed[t.index] = any(t.box.intersect(b) for b in chosen)
    return TileSelection(computed, foreground, boxes)


def _add_foreground_label(output: str | os.PathLike, foreground: Foreground) -> None:
    """Create the result's foreground label image, which each task writes with its block
    (``Block.foreground``); blocks with nothing computed have no foreground and keep the
    fill value, 0."""
    add_label_image(
        output,
        FOREGROUND_LABEL,
        FOREGROUND_MEANINGS,
        long_name=f"foreground mask ({foreground.kind})",
    )
