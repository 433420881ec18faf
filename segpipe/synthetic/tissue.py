"""Synthetic H&E whole-slide scans with exact ground truth: :func:`tissue_slide`.

How a slide is built, coarse to fine:

* **Tissue**: low-frequency noise generated on a coarse grid (at most 512 cells a side),
  thresholded at the quantile that gives the slide's tissue fraction (45-65 %), bilinearly
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
"""

from __future__ import annotations

import math

import numpy as np

from segpipe.geometry.foreground import upsample_mask
from segpipe.synthetic.slide import (
    NUCLEUS,
    ROW_BLOCK,
    Bilinear,
    SyntheticSlide,
    coarse_shape,
    parse_shape,
    smooth_noise,
)

# Optical density per unit stain concentration, (R, G, B): Ruifrok & Johnston (2001).
_HEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)
# Clean glass is not quite white: a faint warm cast, as after a scanner's white balance.
_GLASS_OD = np.array([0.025, 0.035, 0.020], dtype=np.float32)


def tissue_slide(
    shape: int | tuple[int, int],
    *,
    seed: int = 0,
    pixel_size_um: float = 0.5,
    tissue_fraction: float | None = None,
    tissue_region: np.ndarray | None = None,
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
    tissue_fraction
        Share of the slide covered by tissue, in (0, 1] (default: drawn from 0.45-0.65), glass
        elsewhere: 0.3 makes a typical biopsy scan, mostly glass. The tissue's shape is the
        one the same seed gives without it (its edge moved); its stain, nuclei and noise are
        drawn anew, as their number follows the tissue's area.
    tissue_region
        ``(y, x)`` bool, any size (resized to the slide by nearest neighbour,
        :func:`segpipe.geometry.foreground.upsample_mask`): tissue only where True, glass
        elsewhere. Nuclei follow, so the truth stays exact.

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
    shape = parse_shape(shape)
    if min(shape) < 16:
        raise ValueError(f"slide shape must be at least 16 px a side, got {shape}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_memory_for(shape)
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um}")
    rng = np.random.default_rng(seed)
    coarse = coarse_shape(shape)

    # Two float32 work planes besides the outputs: the soft tissue mask becomes the
    # hematoxylin plane once it has masked the eosin plane.
    if tissue_fraction is not None and not (
        isinstance(tissue_fraction, int | float) and 0 < tissue_fraction <= 1
    ):
        raise ValueError(f"tissue_fraction must be in (0, 1], got {tissue_fraction!r}")
    hema = _tissue_alpha(rng, shape, coarse, tissue_fraction)
    if tissue_region is not None:
        region = np.asarray(tissue_region, dtype=bool)
        if region.ndim != 2 or min(region.shape) < 1:
            raise ValueError(f"tissue_region must be a (y, x) bool array, got {region.shape}")
        for r0 in range(0, shape[0], ROW_BLOCK):
            r1 = min(r0 + ROW_BLOCK, shape[0])
            hema[r0:r1] *= upsample_mask(region, shape, (r0, r1, 0, shape[1]))
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


# What a slide takes at its peak, per pixel: the image, labels and instances returned (8 B)
# and two float32 work planes, about 2.5 times the outputs (see tissue_slide's Notes).
PEAK_BYTES_PER_PIXEL = 20


def check_memory_for(shape: tuple[int, int]) -> None:
    """ValueError, before any array is made, where a slide of ``shape`` would need more
    memory than this machine has available: numpy's came after minutes, or the kernel's
    out-of-memory killer ended the process (a 10-megapixel side asks 2 PB)."""
    import psutil

    needed = PEAK_BYTES_PER_PIXEL * shape[0] * shape[1]
    available = psutil.virtual_memory().available
    if needed > available:
        raise ValueError(
            f"a {shape[0]} x {shape[1]} px synthetic slide takes about {needed / 2**30:,.1f} GiB "
            f"to make, more than the {available / 2**30:,.1f} GiB available; give a smaller "
            "size (--size)"
        )


def _tissue_alpha(
    rng: np.random.Generator,
    shape: tuple[int, int],
    coarse: tuple[int, int],
    fraction: float | None = None,
) -> np.ndarray:
    """Soft tissue mask, float32 in [0, 1], >= 0.5 on ``fraction`` of the slide (default:
    drawn from 45-65 %).

    A few large irregular pieces per slide; the edge ramps from glass to tissue over about a
    pixel and a half, which is the scanner's blur (the label boundary is the 0.5 level).
    """
    side = min(coarse)
    # Blobs a few per slide side; a weaker finer field ruffles their edges and opens holes.
    field = smooth_noise(rng, coarse, side / 7)
    field += 0.30 * smooth_noise(rng, coarse, max(side / 28, 1.0))
    field += 0.08 * smooth_noise(rng, coarse, max(side / 90, 0.7))
    drawn = rng.uniform(0.45, 0.65)  # drawn always: a given fraction keeps the tissue's shape
    threshold = np.quantile(field, 1.0 - (drawn if fraction is None else fraction))
    # The field's slope per slide pixel where it crosses the threshold sets the ramp's width.
    gy, gx = np.gradient(field)
    slope = np.hypot(gy, gx)
    near = np.abs(field - threshold) < 0.1
    cells_per_px = coarse[0] / shape[0]
    slope_px = float(np.median(slope[near])) * cells_per_px if near.any() else 1.0
    field -= threshold
    field /= max(slope_px, 1e-6) * 1.5
    field += 0.5
    alpha = Bilinear(field, shape).full()
    np.clip(alpha, 0, 1, out=alpha)
    return alpha


def _eosin(rng: np.random.Generator, shape: tuple[int, int], coarse: tuple[int, int]) -> np.ndarray:
    """Eosin concentration everywhere (the caller masks it to tissue), float32 ``shape``.

    The texture is made at a quarter of the resolution (fibres 2-3 px wide once upsampled);
    pixel-level grain comes from the sensor noise added when rendering.
    """
    quarter = (max(4, math.ceil(shape[0] / 4)), max(4, math.ceil(shape[1] / 4)))
    # Staining strength drifts slowly across the slide.
    strength = 0.5 + 0.12 * smooth_noise(rng, coarse, min(coarse) / 10)
    # Fibres in two orientations, mixed by a slow field, and blotches.
    mix = 1 / (1 + np.exp(-2.5 * smooth_noise(rng, coarse, min(coarse) / 20)))
    texture = smooth_noise(rng, quarter, (0.5, 2.5))
    texture *= Bilinear(mix, quarter).full()
    texture += smooth_noise(rng, quarter, (2.5, 0.5)) * Bilinear(1 - mix, quarter).full()
    texture += 0.7 * smooth_noise(rng, quarter, 1.2)
    texture += 0.5 * smooth_noise(rng, quarter, 0.5)
    # Clefts: where the texture is low the stroma thins out almost to glass.
    texture *= np.float32(0.25)
    texture += np.float32(1.0)
    np.clip(texture, 0.08, None, out=texture)
    texture *= Bilinear(strength, quarter).full()
    return Bilinear(texture, shape).full()


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
    density = smooth_noise(rng, coarse, min(coarse) / 12)
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
    light = Bilinear(0.008 * smooth_noise(rng, coarse, min(coarse) / 3), shape)
    image = np.empty((*shape, 3), dtype=np.uint8)
    for r0 in range(0, shape[0], ROW_BLOCK):
        r1 = min(r0 + ROW_BLOCK, shape[0])
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
