"""Tiling geometry: output tiles, the input windows that produce them, mirror padding.

Pure arithmetic on integers and numpy index arrays; no I/O, no torch, no Dask.
All coordinates are pixels of the level being segmented, ``(y, x)`` order, half-open.

Two ways to cover an image, one per stitching mode:

* **exact** (U-Net overlap-tile): each output tile gets one input window, the tile grown by the
  model's halo on every side (and on the bottom/right by what the model's size rule needs).
  Cropping the model output back to the tile gives, for a valid-padding model, exactly what one
  forward pass over the whole mirrored image gives.
* **blend** (MONAI / nnU-Net sliding window): windows on one global lattice overlap; their
  predictions are averaged with a smooth weight. The lattice depends only on the image shape,
  so whichever task computes a pixel sees the same windows and sums them in the same order:
  tiles agree to the last bit where each window's pass is the same (the model's last bits
  can change with the size of the batch a window rides in).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Box",
    "Geometry",
    "Tile",
    "TileGrid",
    "Window",
    "exact_side",
    "exact_window",
    "exact_windows",
    "mirror_indices",
    "tile_grid",
]


@dataclass(frozen=True)
class Geometry:
    """What a model asks of the tiler.

    Parameters
    ----------
    halo
        Context in pixels a window's input adds on every side of its output for that output to
        be exact, windows on the ``multiple`` lattice. A same-padding network's
        receptive-field margin; a valid one's size margin (92 for the paper's U-Net, whose
        output pixels reach up to ``multiple - 1`` further on one side, by their pooling
        phase, still inside the window's input).
    multiple
        Window sizes and window origins move in steps of this (``2**pools``): a network with
        ``p`` 2x2 poolings is translation-equivariant only for shifts that are multiples of
        ``2**p``.
    input_offset
        Valid input sides ``n`` satisfy ``n % multiple == input_offset % multiple`` (a valid
        U-Net of depth 4 takes 572 = 35 * 16 + 12, so 12).
    shrinks
        True for valid (unpadded) convolutions: the output is ``input - 2 * halo`` pixels a
        side. False for same padding: the output has the input's size and the tiler crops the
        halo.

    Examples
    --------
    >>> g = Geometry(halo=92, multiple=16, input_offset=12, shrinks=True)
    >>> g.input_size(388)
    572
    >>> g.output_size(572)
    388
    """

    halo: int
    multiple: int = 1
    input_offset: int = 0
    shrinks: bool = False

    def __post_init__(self) -> None:
        if self.halo < 0:
            raise ValueError(f"Geometry.halo must be >= 0 pixels, got {self.halo}")
        if self.multiple < 1:
            raise ValueError(f"Geometry.multiple must be >= 1, got {self.multiple}")

    def accepts(self, input_size: int) -> bool:
        """Whether the model takes an input of this side (pixels)."""
        # Valid convolutions need room for a positive output; same padding keeps any size.
        smallest = 2 * self.halo + 1 if self.shrinks else 1
        return input_size >= smallest and (input_size - self.input_offset) % self.multiple == 0

    def input_size(self, min_output: int) -> int:
        """Smallest accepted input side whose usable output covers ``min_output`` pixels."""
        if min_output < 1:
            raise ValueError(f"min_output must be >= 1 pixel, got {min_output}")
        n = min_output + 2 * self.halo
        return n + (self.input_offset - n) % self.multiple

    def output_size(self, input_size: int) -> int:
        """Side of the model's output (pixels) for an input of ``input_size``."""
        if not self.accepts(input_size):
            raise ValueError(
                f"input side {input_size} px is not accepted by {self}: use "
                f"Geometry.input_size() to pick one"
            )
        return input_size - 2 * self.halo if self.shrinks else input_size

    @property
    def crop(self) -> int:
        """Where the usable output starts in the model output (pixels from its top-left)."""
        return 0 if self.shrinks else self.halo


@dataclass(frozen=True)
class Box:
    """A half-open rectangle ``[y0, y1) x [x0, x1)`` in pixels; may reach outside the image."""

    y0: int
    y1: int
    x0: int
    x1: int

    def __post_init__(self) -> None:
        if self.y1 <= self.y0 or self.x1 <= self.x0:
            raise ValueError(f"empty box {self}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def intersect(self, other: Box) -> Box | None:
        y0, y1 = max(self.y0, other.y0), min(self.y1, other.y1)
        x0, x1 = max(self.x0, other.x0), min(self.x1, other.x1)
        return Box(y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None

    def relative_to(self, origin: Box) -> tuple[slice, slice]:
        """Slices selecting this box inside an array that covers ``origin``."""
        return (
            slice(self.y0 - origin.y0, self.y1 - origin.y0),
            slice(self.x0 - origin.x0, self.x1 - origin.x0),
        )


@dataclass(frozen=True)
class Window:
    """One model input and the output it gives (global pixel boxes)::

        input (read from the mirrored image)
        +--------------------------+
        | halo                     |
        |   +------------------+   |
        |   | output           |   |
        |   +------------------+   |
        +--------------------------+

    ``output`` is what the model predicts once ``crop`` pixels are cut from the top-left
    of its raw output (0 for valid convolutions, the halo for same padding).
    """

    input: Box
    output: Box
    crop: int


@dataclass(frozen=True)
class Tile:
    """One output tile: a chunk of the result arrays, always inside the image."""

    index: tuple[int, int]
    box: Box


@dataclass(frozen=True)
class TileGrid:
    """The tiles of an image of ``shape`` (Y, X) pixels, ``tile`` pixels a side.

    Tiles coincide with the result's Zarr chunks, so a task that writes whole tiles
    writes whole chunks and needs no lock.

    >>> grid = tile_grid((1000, 700), 512)
    >>> grid.grid_shape, len(grid)
    ((2, 2), 4)
    >>> grid[1, 1].box
    Box(y0=512, y1=1000, x0=512, x1=700)
    """

    shape: tuple[int, int]
    tile: int

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (math.ceil(self.shape[0] / self.tile), math.ceil(self.shape[1] / self.tile))

    def __len__(self) -> int:
        ny, nx = self.grid_shape
        return ny * nx

    def __getitem__(self, index: tuple[int, int]) -> Tile:
        iy, ix = index
        ny, nx = self.grid_shape
        if not (0 <= iy < ny and 0 <= ix < nx):
            raise IndexError(f"tile {index} outside grid {self.grid_shape}")
        t = self.tile
        box = Box(
            iy * t, min((iy + 1) * t, self.shape[0]), ix * t, min((ix + 1) * t, self.shape[1])
        )
        return Tile((iy, ix), box)

    def __iter__(self) -> Iterator[Tile]:
        ny, nx = self.grid_shape
        for iy in range(ny):
            for ix in range(nx):
                yield self[iy, ix]

    def blocks(self, side: int) -> list[list[Tile]]:
        """Tiles grouped in ``side x side`` blocks (row-major), one block per task."""
        if side < 1:
            raise ValueError(f"block side must be >= 1 tile, got {side}")
        ny, nx = self.grid_shape
        return [
            [
                self[iy, ix]
                for iy in range(by, min(by + side, ny))
                for ix in range(bx, min(bx + side, nx))
            ]
            for by in range(0, ny, side)
            for bx in range(0, nx, side)
        ]


def tile_grid(shape: tuple[int, int], tile: int) -> TileGrid:
    """Grid of ``tile``-pixel output tiles over an image of ``shape`` (Y, X) pixels."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1 pixel, got {tile}")
    if min(shape) < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    return TileGrid((int(shape[0]), int(shape[1])), int(tile))


def exact_window(tile: Tile, tile_size: int, geometry: Geometry) -> Window:
    """The input window whose cropped output is ``tile`` (overlap-tile strategy).

    Every window has the same input side, ``geometry.input_size(tile_size)``, even for the
    truncated last tiles, so batches have one shape; the extra output is mirrored context that
    the caller crops away. ``tile_size`` must be a multiple of ``geometry.multiple`` so window
    origins keep the pooling phase of a whole-image pass.

    >>> g = Geometry(halo=92, multiple=16, input_offset=12, shrinks=True)
    >>> w = exact_window(tile_grid((1000, 1000), 512)[0, 1], 512, g)
    >>> w.input, w.output.shape
    (Box(y0=-92, y1=608, x0=420, x1=1120), (516, 516))
    """
    return _exact_window_at(tile.box.y0, tile.box.x0, tile_size, geometry)


def exact_windows(region: Box, side: int, geometry: Geometry) -> list[Window]:
    """Overlap-tile windows of at most ``side`` output pixels that cover ``region``, row-major.

    Windows larger than a tile pay the halo once for many tiles: a block of 2 x 2 tiles of
    512 px under one 1024 px window reads 1116^2 input pixels for the shipped U-Net (halo 44)
    instead of 4 x 604^2, 19% of halo instead of 39%. Origins step by ``side`` from the
    region's top-left corner, which must keep the pooling phase (a multiple of
    ``geometry.multiple``, as tile origins are); the output stays equal to one pass over the
    whole mirrored image. The last window of each axis is cut to what is left of ``region``
    (rounded up to the multiple), so a region that is not a whole number of ``side`` pays
    no window pixels past its end but those; a region of whole ``side`` steps gives windows
    of one shape, which batch together.

    >>> g = Geometry(halo=44, multiple=8, input_offset=4, shrinks=True)
    >>> [w.input for w in exact_windows(Box(0, 1000, 1024, 1536), 1024, g)]
    [Box(y0=-44, y1=1048, x0=980, x1=1584)]
    >>> len(exact_windows(Box(0, 1024, 0, 1024), 512, g))
    4
    """
    if region.y0 % geometry.multiple or region.x0 % geometry.multiple:
        raise ValueError(
            f"region {region} must start on a multiple of the model's size multiple "
            f"{geometry.multiple} (a tile's corner)"
        )
    m = geometry.multiple

    def step(start: int, stop: int) -> int:
        return min(side, stop - start + (start - stop) % m)

    return [
        _exact_window_at(y, x, (step(y, region.y1), step(x, region.x1)), geometry)
        for y in range(region.y0, region.y1, side)
        for x in range(region.x0, region.x1, side)
    ]


def exact_side(region: Box, tile: int, geometry: Geometry, max_input_pixels: int) -> int:
    """The output side of the exact windows of ``region``: the most tiles per side whose
    window's input fits ``max_input_pixels`` (a device's memory), at least one tile, at most
    the region.

    >>> g = Geometry(halo=44, multiple=8, input_offset=4, shrinks=True)
    >>> exact_side(Box(0, 1024, 0, 1024), 512, g, 1116**2)
    1024
    >>> exact_side(Box(0, 1024, 0, 1024), 512, g, 1116**2 - 1)
    512
    >>> exact_side(Box(0, 1024, 0, 700), 512, g, 10**9)
    1024
    """
    tiles = math.ceil(max(region.shape) / tile)
    while tiles > 1 and geometry.input_size(tiles * tile) ** 2 > max_input_pixels:
        tiles -= 1
    return tiles * tile


def _exact_window_at(y0: int, x0: int, side: int | tuple[int, int], geometry: Geometry) -> Window:
    """The window whose usable output starts at ``(y0, x0)`` and covers ``side`` pixels
    (one int: a square; else ``(height, width)``), each a multiple of ``geometry.multiple``."""
    h, w = (side, side) if isinstance(side, int) else side
    for s in (h, w):
        if s % geometry.multiple:
            raise ValueError(
                f"tile size {s} px is not a multiple of the model's size multiple "
                f"{geometry.multiple}; use {s + (-s) % geometry.multiple}"
            )
    ny, nx = geometry.input_size(h), geometry.input_size(w)
    g = geometry.halo
    inp = Box(y0 - g, y0 - g + ny, x0 - g, x0 - g + nx)
    return Window(inp, Box(y0, y0 + ny - 2 * g, x0, x0 + nx - 2 * g), geometry.crop)


def mirror_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indices for positions ``start .. stop-1`` of an axis of ``size``, mirrored at
    both ends without repeating the edge (numpy's ``"reflect"``), for any distance outside.

    >>> mirror_indices(-3, 6, 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1]
    """
    if size < 1:
        raise ValueError(f"axis size must be >= 1, got {size}")
    i = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(i)
    period = 2 * (size - 1)
    i = np.mod(i, period)
    return np.where(i < size, i, period - i)
