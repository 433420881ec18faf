"""Synthetic aerial scenes with exact ground truth: :func:`aerial_scene`.

An aerial-photograph-like map (other ground, buildings, roads, vegetation, water) with building
instances, rows of houses sharing walls among them: the touching-objects problem of the
tissue slides at another scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from segpipe.synthetic.slide import (
    Bilinear,
    SyntheticSlide,
    coarse_shape,
    parse_shape,
    smooth_noise,
)

AERIAL_CLASS_NAMES = ("other", "building", "road", "vegetation", "water")
OTHER, BUILDING, ROAD, VEGETATION, WATER = range(5)

# Base colours (RGB, 0-255) of an aerial orthophoto in summer.
_SOIL = np.array([158, 138, 106], dtype=np.float32)
_GRASS = np.array([132, 146, 96], dtype=np.float32)
_TREES = np.array([52, 82, 46], dtype=np.float32)
_WATER = np.array([42, 66, 82], dtype=np.float32)
_ASPHALT = np.array([108, 108, 112], dtype=np.float32)
_ROOFS = np.array(
    [[168, 74, 58], [140, 140, 146], [112, 92, 80], [196, 192, 186], [92, 96, 104]],
    dtype=np.float32,
)


def aerial_scene(
    shape: int | tuple[int, int], *, seed: int = 0, pixel_size_um: float = 500_000.0
) -> SyntheticSlide:
    """Generate an aerial-photograph-like scene with its class and building-instance labels.

    Parameters
    ----------
    shape
        ``(Y, X)`` in pixels, or one int for a square scene; at least 16 a side.
    seed
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    pixel_size_um
        Micrometres per pixel (the unit segpipe uses everywhere): 500 000 is 0.5 m, a typical
        orthophoto. Sets the size in pixels of buildings (8-15 m), roads (6-10 m), blobs.

    Returns
    -------
    SyntheticSlide
        ``image`` (Y, X, 3) uint8, ``labels`` (Y, X) uint8 with :data:`AERIAL_CLASS_NAMES`
        (0 other ground, 1 building, 2 road, 3 vegetation, 4 water), ``instances`` (Y, X)
        int32 building ids 1..n, ``labels == 1`` exactly where ``instances > 0``.

    Notes
    -----
    * **Water** and **vegetation**: smooth noise thresholded at quantiles (water 3-10 % of
      the scene, vegetation 15-30 %), vegetation never on water.
    * **Roads**: a network of near-horizontal and near-vertical straight roads, some of them
      dead ends, 6-10 m wide, 60-140 m apart, drawn over everything (bridges over water).
    * **Buildings**: axis-aligned rectangles in rows along both sides of the roads, set back a
      few metres; the houses of a row share walls (touching instances) and each has a gabled
      roof (two halves lit differently) of its own colour; some larger free-standing ones.
      They sit on ground or vegetation only, and cast a shadow to the south-east.
    * Whole-image float planes: about 40 bytes per pixel at the peak (a 4096 x 4096 scene
      takes about 0.7 GB and a few seconds).

    Examples
    --------
    >>> scene = aerial_scene((200, 300), seed=1)
    >>> scene.image.shape, scene.class_names[1], scene.pixel_size_um
    ((200, 300, 3), 'building', 500000.0)
    >>> bool(np.array_equal(scene.labels == 1, scene.instances > 0))
    True
    """
    shape = parse_shape(shape)
    if min(shape) < 16:
        raise ValueError(f"scene shape must be at least 16 px a side, got {shape}")
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um}")
    rng = np.random.default_rng(seed)
    coarse = coarse_shape(shape)
    px_per_m = 1e6 / pixel_size_um

    labels = np.full(shape, OTHER, dtype=np.uint8)
    water_field = _field(rng, shape, coarse, 40 * px_per_m)
    water = water_field >= np.quantile(water_field, 1 - rng.uniform(0.03, 0.10))
    veg_field = _field(rng, shape, coarse, 12 * px_per_m)
    veg_field += 0.4 * _field(rng, shape, coarse, 4 * px_per_m)
    vegetation = veg_field >= np.quantile(veg_field, 1 - rng.uniform(0.15, 0.30))
    labels[vegetation] = VEGETATION
    labels[water] = WATER
    roads = _roads(rng, shape, px_per_m)
    for line in roads:
        labels[_road_mask(shape, line)] = ROAD
    instances = np.zeros(shape, dtype=np.int32)
    roofs = _place_buildings(rng, labels, instances, roads, px_per_m)

    image = _render_aerial(rng, labels, instances, roofs, coarse, px_per_m)
    return SyntheticSlide(
        image, labels, instances, float(pixel_size_um), class_names=AERIAL_CLASS_NAMES
    )


def _field(
    rng: np.random.Generator, shape: tuple[int, int], coarse: tuple[int, int], scale_px: float
) -> np.ndarray:
    """Smooth noise with features about ``scale_px`` pixels across, float32 ``shape``."""
    cells_per_px = coarse[0] / shape[0]
    return Bilinear(smooth_noise(rng, coarse, max(scale_px * cells_per_px, 0.7)), shape).full()


@dataclass(frozen=True)
class _Road:
    """A straight road: ``across = offset + slope * along`` on ``[start, stop)`` of ``along``;
    ``along`` is x for a horizontal road (``is_vertical`` False), y for a vertical one."""

    offset: float
    slope: float
    half_width: float
    start: int
    stop: int
    is_vertical: bool

    def centre(self, along: np.ndarray) -> np.ndarray:
        """Across-position of the centre line at each ``along`` position (pixels)."""
        return self.offset + self.slope * along.astype(np.float64)


def _roads(rng: np.random.Generator, shape: tuple[int, int], px_per_m: float) -> list[_Road]:
    roads = []
    for is_vertical in (False, True):
        across_n, along_n = (shape[1], shape[0]) if is_vertical else (shape[0], shape[1])
        pos = rng.uniform(-30, 30) * px_per_m
        while True:
            pos += rng.uniform(60, 140) * px_per_m
            if pos >= across_n:
                break
            start, stop = 0, along_n
            if rng.random() < 0.3:  # a dead end from one side
                cut = int(rng.uniform(0.3, 0.8) * along_n)
                start, stop = (cut, along_n) if rng.random() < 0.5 else (0, cut)
            roads.append(
                _Road(
                    offset=pos,
                    slope=rng.uniform(-0.04, 0.04),
                    half_width=rng.uniform(3, 5) * px_per_m,
                    start=start,
                    stop=stop,
                    is_vertical=is_vertical,
                )
            )
    return roads


def _road_mask(shape: tuple[int, int], road: _Road) -> np.ndarray:
    along_n = shape[0] if road.is_vertical else shape[1]
    across_n = shape[1] if road.is_vertical else shape[0]
    along = np.arange(along_n)
    across = np.arange(across_n)
    distance = np.abs(across[None, :] - road.centre(along)[:, None]) / math.hypot(1, road.slope)
    mask = distance <= road.half_width
    mask[: road.start] = False
    mask[road.stop :] = False
    return mask if road.is_vertical else mask.T


def _place_buildings(
    rng: np.random.Generator,
    labels: np.ndarray,
    instances: np.ndarray,
    roads: list[_Road],
    px_per_m: float,
) -> list[np.ndarray]:
    """Rows of houses along the roads and a few free-standing halls, drawn in place.

    Returns each building's roof colour (RGB), indexed by instance id - 1.
    """
    ny, nx = labels.shape
    roofs: list[np.ndarray] = []

    def put(y0: int, x0: int, h: int, w: int, colour: np.ndarray, row: list[int]) -> None:
        y1, x1 = y0 + h, x0 + w
        if y0 < 0 or x0 < 0 or y1 > ny or x1 > nx or h < 3 or w < 3:
            return
        # A pixel's margin keeps houses off roads, water and other rows' houses; the houses
        # of one row may share walls.
        grown = (slice(max(y0 - 1, 0), y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
        free = np.isin(labels[grown], (OTHER, VEGETATION)) | np.isin(instances[grown], row)
        if not free.all():
            return
        row.append(len(roofs) + 1)
        labels[y0:y1, x0:x1] = BUILDING
        instances[y0:y1, x0:x1] = len(roofs) + 1
        roofs.append(colour)

    for road in roads:
        along = float(road.start) + rng.uniform(0, 10) * px_per_m
        while along < road.stop:
            count = int(rng.integers(1, 6))
            width = rng.uniform(8, 15, count) * px_per_m
            depth = rng.uniform(8, 14) * px_per_m
            setback = rng.uniform(2, 6) * px_per_m
            side = 1 if rng.random() < 0.5 else -1
            base = _ROOFS[int(rng.integers(len(_ROOFS)))]
            edge = road.offset + road.slope * along + side * (road.half_width + setback)
            near = round(edge) if side > 0 else round(edge - depth)
            pos = along
            row: list[int] = []
            for k in range(count):  # one row: houses side by side, sharing walls
                colour = np.clip(base * rng.uniform(0.85, 1.15), 0, 255)
                a0, length = round(pos), round(width[k])
                if road.is_vertical:
                    put(a0, near, length, round(depth), colour, row)
                else:
                    put(near, a0, round(depth), length, colour, row)
                pos += length
            along = pos + rng.uniform(3, 12) * px_per_m
    # Large free-standing halls (sheds, warehouses) off the roads.
    for _ in range(int(ny * nx / (120 * px_per_m) ** 2) + 1):
        h, w = (rng.uniform(15, 35, 2) * px_per_m).astype(int)
        colour = _ROOFS[int(rng.integers(len(_ROOFS)))]
        put(int(rng.integers(ny)), int(rng.integers(nx)), h, w, colour, [])
    return roofs


def _render_aerial(
    rng: np.random.Generator,
    labels: np.ndarray,
    instances: np.ndarray,
    roofs: list[np.ndarray],
    coarse: tuple[int, int],
    px_per_m: float,
) -> np.ndarray:
    shape = labels.shape
    # Ground: soil and dry grass mixed by a slow field; every surface gets a fine texture.
    mix = 1 / (1 + np.exp(-2 * _field(rng, shape, coarse, 25 * px_per_m)))
    fine = smooth_noise(rng, shape, max(0.6 * px_per_m, 0.7))
    planes = np.empty((3, *shape), dtype=np.float32)
    for ch in range(3):
        planes[ch] = _SOIL[ch] * (1 - mix) + _GRASS[ch] * mix
    planes *= 1 + 0.06 * fine
    for cls, colour, texture in (
        (VEGETATION, _TREES, 0.30),  # tree crowns: strong light-shadow grain
        (WATER, _WATER, 0.03),
        (ROAD, _ASPHALT, 0.05),
    ):
        where = labels == cls
        grain = 1 + texture * fine[where]
        for ch in range(3):
            planes[ch][where] = colour[ch] * grain

    # Gabled roofs: the two halves either side of the ridge (along the longer side) lit
    # differently, a darker eave one pixel wide.
    if roofs:
        colours = np.stack(roofs)
        ys, xs = np.nonzero(instances)
        ids = instances[ys, xs] - 1
        boxes = ndimage.find_objects(instances)
        y0 = np.array([b[0].start for b in boxes])[ids]
        y1 = np.array([b[0].stop for b in boxes])[ids]
        x0 = np.array([b[1].start for b in boxes])[ids]
        x1 = np.array([b[1].stop for b in boxes])[ids]
        tall = (y1 - y0) > (x1 - x0)
        first_half = np.where(tall, xs < (x0 + x1) / 2, ys < (y0 + y1) / 2)
        light = np.where(first_half, 1.12, 0.84)
        eave = (ys == y0) | (ys == y1 - 1) | (xs == x0) | (xs == x1 - 1)
        light = np.where(eave, 0.75, light).astype(np.float32)
        for ch in range(3):
            planes[ch][ys, xs] = colours[ids, ch] * light * (1 + 0.03 * fine[ys, xs])
        # Shadows to the south-east, on whatever is not a building.
        s = max(1, round(3 * px_per_m))
        shadow = np.zeros(shape, dtype=bool)
        shadow[s:, s:] = instances[:-s, :-s] > 0
        shadow &= instances == 0
        planes[:, shadow] *= np.float32(0.55)

    # Camera blur, then sensor noise.
    for ch in range(3):
        planes[ch] = ndimage.gaussian_filter(planes[ch], 0.6)
    planes += rng.standard_normal(planes.shape, dtype=np.float32) * np.float32(3.0)
    np.clip(planes, 0, 255, out=planes)
    np.rint(planes, out=planes)
    return np.ascontiguousarray(planes.transpose(1, 2, 0).astype(np.uint8))
