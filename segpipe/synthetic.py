"""Synthetic H&E whole-slide scans with exact ground truth, generated in memory.

Nothing here reads or writes files and nothing is downloaded: a slide is a function of its
shape, its seed and its pixel size. It is meant to look enough like a brightfield H&E scan that a
model trained on it behaves like one trained on real slides for the pipeline's purposes (tiling,
halos, stitching, metrics), and to give labels no annotator could: every pixel's class and every
nucleus's identity.

How a slide is built, coarse to fine:

* **Tissue**: low-frequency noise generated on a coarse grid (at most 512 cells a side),
  thresholded at the quantile that gives the slide's tissue fraction (40-70 %), bilinearly
  upsampled. Large smooth irregular blobs with holes, at the cost of a few small arrays.
* **Stain**: colours follow Beer-Lambert absorption, ``rgb = 255 * exp(-od)``, with the optical
  density a sum of hematoxylin and eosin concentrations times their Ruifrok-Johnston stain
  vectors. Eosin (pink) fills the tissue with fibre-like streaks, blotches and clefts; a
  little hematoxylin tints the stroma.
* **Nuclei**: hematoxylin-dense (dark purple) filled ellipses, 3-6 µm in radius at the slide's
  pixel size, placed in clusters so that many touch or sit one pixel apart, wholly inside the
  tissue; later nuclei are occluded by earlier ones, so instance masks never overlap. Each
  has its own stain density, chromatin texture, a darker rim and a soft (about one pixel) edge.
* **Glass**: near-white with a faint illumination gradient; sensor noise over everything.

Labels are exact: ``labels == 2`` exactly where ``instances > 0``, nuclei only inside tissue.

A second scene, :func:`aerial_scene`, is an aerial-photograph-like map (other ground,
buildings, roads, vegetation, water) with building instances, rows of houses sharing walls
among them: the same touching-objects problem at another scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

__all__ = [
    "AERIAL_CLASS_NAMES",
    "BACKGROUND",
    "CLASS_NAMES",
    "NUCLEUS",
    "TISSUE",
    "SyntheticSlide",
    "aerial_scene",
    "tissue_slide",
]

CLASS_NAMES = ("background", "tissue", "nucleus")
BACKGROUND, TISSUE, NUCLEUS = 0, 1, 2
AERIAL_CLASS_NAMES = ("other", "building", "road", "vegetation", "water")

# Optical density per unit stain concentration, (R, G, B): Ruifrok & Johnston (2001).
_HEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)
# Clean glass is not quite white: a faint warm cast, as after a scanner's white balance.
_GLASS_OD = np.array([0.025, 0.035, 0.020], dtype=np.float32)

_COARSE_CELLS = 512  # the coarse grid's longer side, in cells
_ROW_BLOCK = 256  # rows per block of full-size work, to keep temporaries small


@dataclass(frozen=True)
class SyntheticSlide:
    """A generated slide and its ground truth.

    Attributes
    ----------
    image
        ``(Y, X, 3)`` uint8 RGB.
    labels
        ``(Y, X)`` uint8 class per pixel, ``class_names[k]`` for value ``k`` (tissue slides: 0
        background (glass), 1 tissue, 2 nucleus).
    instances
        ``(Y, X)`` int32 object id per pixel (nuclei, buildings), 0 outside objects; ids 1..n.
    pixel_size_um
        Side of one pixel in micrometres.
    class_names
        Names of the label values, in order.
    """

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    pixel_size_um: float = 0.5
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        shape = self.labels.shape
        if self.image.shape != (*shape, 3) or self.instances.shape != shape:
            raise ValueError(
                f"SyntheticSlide arrays disagree: image {self.image.shape}, labels {shape}, "
                f"instances {self.instances.shape}; expected (Y, X, 3), (Y, X), (Y, X)"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(Y, X)`` in pixels."""
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))

    def crop(self, y: int, x: int, size: int | tuple[int, int]) -> SyntheticSlide:
        """The ``size`` pixels (one int for a square) whose top-left corner is ``(y, x)``.

        The crop is a view (no copy) and must lie inside the slide.
        """
        h, w = _parse_shape(size)
        if not (y >= 0 and x >= 0 and y + h <= self.shape[0] and x + w <= self.shape[1]):
            raise ValueError(
                f"crop at (y={y}, x={x}) of {(h, w)} px does not fit a slide of {self.shape} px"
            )
        sl = (slice(y, y + h), slice(x, x + w))
        return replace(
            self, image=self.image[sl], labels=self.labels[sl], instances=self.instances[sl]
        )

    def random_crop(self, size: int | tuple[int, int], rng: np.random.Generator) -> SyntheticSlide:
        """A crop of ``size`` pixels at a uniformly random position (a view, no copy).

        >>> slide = tissue_slide(128, seed=1)
        >>> slide.random_crop(32, np.random.default_rng(0)).shape
        (32, 32)
        """
        h, w = _parse_shape(size)
        if h > self.shape[0] or w > self.shape[1]:
            raise ValueError(f"crop of {(h, w)} px is larger than the slide, {self.shape} px")
        y = int(rng.integers(0, self.shape[0] - h + 1))
        x = int(rng.integers(0, self.shape[1] - w + 1))
        return self.crop(y, x, (h, w))

    def class_fractions(self) -> np.ndarray:
        """Fraction of the pixels in each class, ``(C,)`` float64."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        return counts / self.labels.size


def tissue_slide(
    shape: int | tuple[int, int], *, seed: int = 0, pixel_size_um: float = 0.5
) -> SyntheticSlide:
    """Generate an H&E-like whole-slide scan with its class and nucleus-instance labels.

    Parameters
    ----------
    shape
        ``(Y, X)`` in pixels, or one int for a square slide; at least 16 a side.
    seed
        Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed, shape and
        pixel size give the same slide, bit for bit.
    pixel_size_um
        Micrometres per pixel; sets the nuclei's size in pixels (radius 3-6 µm). 0.5 is a
        typical 20x scan, 0.25 a 40x one.

    Returns
    -------
    SyntheticSlide
        ``image`` (Y, X, 3) uint8, ``labels`` (Y, X) uint8, ``instances`` (Y, X) int32.

    Notes
    -----
    Two float32 work planes besides the outputs, everything else in row blocks: memory peaks
    at about 2.5 times the returned arrays (1.2 GB for 8192 x 8192, which takes about 10 s on
    one core).

    Examples
    --------
    >>> slide = tissue_slide((256, 384), seed=3)
    >>> slide.image.shape, slide.image.dtype, slide.labels.dtype, slide.instances.dtype
    ((256, 384, 3), dtype('uint8'), dtype('uint8'), dtype('int32'))
    >>> bool(np.array_equal(slide.labels == 2, slide.instances > 0))
    True
    """
    shape = _parse_shape(shape)
    if min(shape) < 16:
        raise ValueError(f"slide shape must be at least 16 px a side, got {shape}")
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um}")
    rng = np.random.default_rng(seed)
    coarse = _coarse_shape(shape)

    # Two float32 work planes besides the outputs: the soft tissue mask becomes the
    # hematoxylin plane once it has masked the eosin plane.
    hema = _tissue_alpha(rng, shape, coarse)
    labels = np.empty(shape, dtype=np.uint8)
    np.greater_equal(hema, 0.5, out=labels, casting="unsafe")
    eosin = _eosin(rng, shape, coarse)
    eosin *= hema
    # A faint hematoxylin tint in the stroma, as in real H&E.
    hema *= np.float32(0.06)

    instances = np.zeros(shape, dtype=np.int32)
    _paint_nuclei(rng, labels, coarse, pixel_size_um, hema, eosin, instances)
    labels[instances > 0] = NUCLEUS
    image = _render_rgb(rng, eosin, hema, coarse)
    return SyntheticSlide(image, labels, instances, float(pixel_size_um))


def _parse_shape(shape: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(shape, int | np.integer):
        return (int(shape), int(shape))
    if len(shape) != 2:
        raise ValueError(f"shape must be an int or (Y, X), got {shape!r}")
    return (int(shape[0]), int(shape[1]))


def _coarse_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The grid, at most ``_COARSE_CELLS`` a side, on which smooth fields are generated."""
    factor = max(1, math.ceil(max(shape) / _COARSE_CELLS))
    return (max(4, math.ceil(shape[0] / factor)), max(4, math.ceil(shape[1] / factor)))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-filtered white noise, normalised to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


class _Bilinear:
    """Bilinear resize of a small ``field`` to ``shape``, row block by row block.

    Cell centres are aligned and edges clamped. Columns are interpolated once, on the few
    input rows; each block of output rows is then two contiguous row gathers, so a gigapixel
    plane is produced without any full-size temporary.
    """

    def __init__(self, field: np.ndarray, shape: tuple[int, int]) -> None:
        field = np.asarray(field, dtype=np.float32)
        self.y0, self.y1, self.wy = self._taps(shape[0], field.shape[0])
        x0, x1, wx = self._taps(shape[1], field.shape[1])
        wx = wx.T
        # C order matters: the row gathers below are then contiguous copies.
        self.rows_x = np.ascontiguousarray(field[:, x0] * (1 - wx) + field[:, x1] * wx)
        self.shape = shape

    @staticmethod
    def _taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        i0 = pos.astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (pos - i0).astype(np.float32)[:, None]

    def rows(self, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Output rows ``r0 .. r1-1``, ``(r1 - r0, X)`` float32."""
        w = self.wy[r0:r1]
        out = np.multiply(self.rows_x[self.y0[r0:r1]], 1 - w, out=out)
        out += self.rows_x[self.y1[r0:r1]] * w
        return out

    def full(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        for r0 in range(0, self.shape[0], _ROW_BLOCK):
            r1 = min(r0 + _ROW_BLOCK, self.shape[0])
            self.rows(r0, r1, out=out[r0:r1])
        return out


def _tissue_alpha(
    rng: np.random.Generator, shape: tuple[int, int], coarse: tuple[int, int]
) -> np.ndarray:
    """Soft tissue mask, float32 in [0, 1], >= 0.5 on 40-70 % of the slide.

    A few large irregular pieces per slide; the edge ramps from glass to tissue over about a
    pixel and a half, which is the scanner's blur (the label boundary is the 0.5 level).
    """
    side = min(coarse)
    # Blobs a few per slide side; a weaker finer field ruffles their edges and opens holes.
    field = _smooth_noise(rng, coarse, side / 7)
    field += 0.30 * _smooth_noise(rng, coarse, max(side / 28, 1.0))
    field += 0.08 * _smooth_noise(rng, coarse, max(side / 90, 0.7))
    threshold = np.quantile(field, 1.0 - rng.uniform(0.45, 0.65))
    # The field's slope per slide pixel where it crosses the threshold sets the ramp's width.
    gy, gx = np.gradient(field)
    slope = np.hypot(gy, gx)
    near = np.abs(field - threshold) < 0.1
    cells_per_px = coarse[0] / shape[0]
    slope_px = float(np.median(slope[near])) * cells_per_px if near.any() else 1.0
    field -= threshold
    field /= max(slope_px, 1e-6) * 1.5
    field += 0.5
    alpha = _Bilinear(field, shape).full()
    np.clip(alpha, 0, 1, out=alpha)
    return alpha


def _eosin(rng: np.random.Generator, shape: tuple[int, int], coarse: tuple[int, int]) -> np.ndarray:
    """Eosin concentration everywhere (the caller masks it to tissue), float32 ``shape``.

    The texture is made at a quarter of the resolution (fibres 2-3 px wide once upsampled);
    pixel-level grain comes from the sensor noise added when rendering.
    """
    quarter = (max(4, math.ceil(shape[0] / 4)), max(4, math.ceil(shape[1] / 4)))
    # Staining strength drifts slowly across the slide.
    strength = 0.5 + 0.12 * _smooth_noise(rng, coarse, min(coarse) / 10)
    # Fibres in two orientations, mixed by a slow field, and blotches.
    mix = 1 / (1 + np.exp(-2.5 * _smooth_noise(rng, coarse, min(coarse) / 20)))
    texture = _smooth_noise(rng, quarter, (0.5, 2.5))
    texture *= _Bilinear(mix, quarter).full()
    texture += _smooth_noise(rng, quarter, (2.5, 0.5)) * _Bilinear(1 - mix, quarter).full()
    texture += 0.7 * _smooth_noise(rng, quarter, 1.2)
    texture += 0.5 * _smooth_noise(rng, quarter, 0.5)
    # Clefts: where the texture is low the stroma thins out almost to glass.
    texture *= np.float32(0.25)
    texture += np.float32(1.0)
    np.clip(texture, 0.08, None, out=texture)
    texture *= _Bilinear(strength, quarter).full()
    return _Bilinear(texture, shape).full()


def _paint_nuclei(
    rng: np.random.Generator,
    tissue: np.ndarray,
    coarse: tuple[int, int],
    pixel_size_um: float,
    hema: np.ndarray,
    eosin: np.ndarray,
    instances: np.ndarray,
) -> None:
    """Draw clustered, partly touching nuclei into ``hema``/``eosin``/``instances`` in place."""
    ny, nx = tissue.shape
    # Mean radius (px) and area, for the count; radii are drawn per nucleus below.
    radius_px = 4.5 / pixel_size_um
    mean_area = math.pi * radius_px**2 * 1.15
    coverage = rng.uniform(0.16, 0.28)  # of the tissue area, before occlusion
    n_nuclei = int(coverage * np.count_nonzero(tissue) / mean_area)
    if n_nuclei == 0:
        return
    # Denser (inflamed) and sparser regions: cluster seeds are accepted in proportion.
    density = _smooth_noise(rng, coarse, min(coarse) / 12)
    density = np.clip(0.55 + 0.45 * density, 0.1, 1.0)

    sizes = np.minimum(1 + rng.geometric(0.45, size=n_nuclei), 7)  # cluster sizes, mean ~2.7
    n_clusters = max(1, int(n_nuclei / sizes.mean()))
    sizes = sizes[:n_clusters]
    seeds = _cluster_seeds(rng, tissue, density, n_clusters)
    sizes = sizes[: len(seeds)]

    # All per-nucleus parameters up front; the loop below only paints.
    total = int(sizes.sum())
    radii = rng.uniform(3.0, 6.0, total) / pixel_size_um
    aspect = rng.uniform(1.0, 1.6, total)
    semi_a = radii * np.sqrt(aspect)
    semi_b = radii / np.sqrt(aspect)
    angle = rng.uniform(0, np.pi, total)
    stain = rng.uniform(0.9, 1.6, total)  # hematoxylin density: pale to hyperchromatic
    gap = rng.uniform(0.80, 1.08, total)  # centre distance / sum of radii: overlap to ~1 px apart
    direction = rng.uniform(0, 2 * np.pi, total)
    parent = rng.random(total)

    centres = np.empty((total, 2))
    k = 0
    for (cy, cx), size in zip(seeds, sizes, strict=True):
        first = k
        centres[k] = cy, cx
        k += 1
        for _ in range(size - 1):
            j = first + int(parent[k] * (k - first))  # attach to a random earlier cluster member
            d = gap[k] * (radii[j] + radii[k])
            centres[k] = centres[j] + d * np.array([np.sin(direction[k]), np.cos(direction[k])])
            k += 1

    edge_px = 1.0  # width of the soft edge
    next_id = 1
    for i in range(total):
        cy, cx = centres[i]
        reach = semi_a[i] + 2
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, ny)
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, nx)
        if y1 <= y0 or x1 <= x0:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        c, s = np.cos(angle[i]), np.sin(angle[i])
        u = (c * dx + s * dy) / semi_a[i]
        v = (c * dy - s * dx) / semi_b[i]
        rho = np.sqrt(u * u + v * v)
        # Signed distance to the outline in pixels, approximated by the radial scale.
        depth = (1 - rho) * np.float32(math.sqrt(semi_a[i] * semi_b[i]))
        box = (slice(y0, y1), slice(x0, x1))
        inside = depth >= 0
        if not tissue[box][inside].all():
            continue  # nuclei lie wholly inside tissue, never cut by its edge
        claimed = inside & (instances[box] == 0)
        if np.count_nonzero(claimed) < 4:
            continue
        instances[box][claimed] = next_id
        next_id += 1
        alpha = np.clip(depth / edge_px + 0.5, 0, 1)
        rim = 1 + 0.3 * np.exp(-0.5 * (depth / 1.5) ** 2)  # chromatin against the membrane
        chromatin = 1 + 0.12 * rng.standard_normal(alpha.shape, dtype=np.float32)
        np.maximum(hema[box], stain[i] * alpha * rim * chromatin, out=hema[box])
        eosin[box] *= 1 - 0.5 * alpha


def _cluster_seeds(
    rng: np.random.Generator, tissue: np.ndarray, density: np.ndarray, count: int
) -> np.ndarray:
    """``count`` (or fewer, if the tissue is tiny) random points in tissue, ``(n, 2)`` float."""
    ny, nx = tissue.shape
    cy_, cx_ = density.shape
    found: list[np.ndarray] = []
    have = 0
    for _ in range(20):
        n = 4 * (count - have) + 16
        pts = rng.random((n, 2)) * (ny, nx)
        iy, ix = pts[:, 0].astype(np.intp), pts[:, 1].astype(np.intp)
        keep = tissue[iy, ix] != 0
        keep &= rng.random(n) < density[iy * cy_ // ny, ix * cx_ // nx]
        found.append(pts[keep])
        have += int(keep.sum())
        if have >= count:
            break
    return np.concatenate(found)[:count]


def _render_rgb(
    rng: np.random.Generator, eosin: np.ndarray, hema: np.ndarray, coarse: tuple[int, int]
) -> np.ndarray:
    """Beer-Lambert rendering of the stain planes to uint8 RGB, with glass and sensor noise.

    Row block by row block, so that the temporaries stay small.
    """
    shape = eosin.shape
    # Uneven illumination: a very slow drift of the glass's optical density.
    light = _Bilinear(0.008 * _smooth_noise(rng, coarse, min(coarse) / 3), shape)
    image = np.empty((*shape, 3), dtype=np.uint8)
    for r0 in range(0, shape[0], _ROW_BLOCK):
        r1 = min(r0 + _ROW_BLOCK, shape[0])
        glass = light.rows(r0, r1)
        # Channel-first planes: numpy is slow when broadcasting over a trailing axis of 3.
        od = np.empty((3, r1 - r0, shape[1]), dtype=np.float32)
        for ch in range(3):
            np.multiply(eosin[r0:r1], _EOSIN[ch], out=od[ch])
            od[ch] += hema[r0:r1] * _HEMATOXYLIN[ch]
            od[ch] += glass
            od[ch] += _GLASS_OD[ch]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= np.float32(255.0)
        # Sensor noise, shared by the channels: after demosaicing and JPEG (chroma subsampled)
        # a scanner's noise is mostly in luminance. It is also the tissue's pixel-level grain.
        noise = rng.standard_normal(od.shape[1:], dtype=np.float32)
        noise *= np.float32(2.0)
        od += noise
        np.clip(od, 0, 255, out=od)
        np.rint(od, out=od)
        image[r0:r1] = od.transpose(1, 2, 0)
    return image


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
    shape = _parse_shape(shape)
    if min(shape) < 16:
        raise ValueError(f"scene shape must be at least 16 px a side, got {shape}")
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um}")
    rng = np.random.default_rng(seed)
    coarse = _coarse_shape(shape)
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
    return _Bilinear(_smooth_noise(rng, coarse, max(scale_px * cells_per_px, 0.7)), shape).full()


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
    fine = _smooth_noise(rng, shape, max(0.6 * px_per_m, 0.7))
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
