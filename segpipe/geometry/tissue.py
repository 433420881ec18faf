"""Stained tissue in a brightfield slide, found on a small image of it: pure numpy and scipy.

:func:`tissue_mask` is Otsu on the HSV saturation (:func:`saturation`, :func:`otsu_threshold`),
clamped so an all-glass or all-tissue image is not split in two, then :func:`clean_mask`: holes
filled, dust removed, grown by a margin. :func:`block_mean` makes the small image where a slide
has no pyramid. :mod:`segpipe.geometry.foreground` maps such masks onto tiles.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["block_mean", "clean_mask", "otsu_threshold", "saturation", "tissue_mask"]


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of an ``(y, x, 3)`` image, float32 in [0, 1].

    Unitless, so the same threshold holds for uint8, uint16 and float images; black is 0.

    >>> saturation(np.array([[[255, 255, 255], [200, 100, 100], [0, 0, 0]]], np.uint8))
    array([[0. , 0.5, 0. ]], dtype=float32)
    """
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"saturation needs an (y, x, 3) RGB image, got shape {rgb.shape}")
    # Channel by channel: a reduction over a last axis of 3 ran 15-20x slower (0.36 s for
    # 2048², uint8). Rounding to float32 keeps order, so it may follow max and min.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b).astype(np.float32)
    lo = np.minimum(np.minimum(r, g), b).astype(np.float32)
    out = np.zeros(hi.shape, dtype=np.float32)
    np.divide(hi - lo, hi, out=out, where=hi > 0)
    return out


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance.

    Values ``> threshold`` form the upper class. A constant input returns its value.

    >>> round(otsu_threshold(np.array([0.0, 0.1, 0.0, 0.9, 1.0, 0.9])), 2)
    0.5
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = v.size - w0
    s0 = np.cumsum(hist * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float((hist * centres).sum()) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    # Empty bins between two modes tie: take the middle of the best plateau, not its start.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    edge = edges[1:-1][best[len(best) // 2]]
    # The histogram put a value equal to the edge in the upper class, where ``> edge`` would
    # not: the cut lies between the classes' nearest values, in the values' own dtype (a
    # float32 array is compared in float32).
    lower, upper = v[v < edge].max(), v[v >= edge].min()
    own = np.asarray(values).dtype
    cut = np.asarray((lower + upper) / 2, dtype=own if own.kind == "f" else np.float64)
    return float(cut if lower <= cut < upper else lower)


def clean_mask(
    mask: np.ndarray, *, min_object_px: int = 0, max_hole_px: int = 0, grow_px: int = 0
) -> np.ndarray:
    """``mask`` (y, x) bool with holes up to ``max_hole_px`` pixels filled, objects under
    ``min_object_px`` pixels removed (dust, debris), then grown by ``grow_px`` pixels
    (a square structuring element: tissue edges the low resolution blurred stay in).

    >>> m = np.zeros((7, 7), bool); m[1:6, 1:6] = True; m[3, 3] = False; m[0, 6] = True
    >>> clean_mask(m, min_object_px=2, max_hole_px=1).astype(int)[:, 3].tolist()
    [0, 1, 1, 1, 1, 1, 0]
    >>> int(clean_mask(m, min_object_px=2, max_hole_px=1)[0, 6])
    0
    """
    out = np.asarray(mask, dtype=bool).copy()
    if max_hole_px > 0:
        holes, n = ndimage.label(~out)
        if n:
            sizes = np.bincount(holes.ravel())
            # A hole touching the border is the outside, not a hole.
            border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
            small = sizes <= max_hole_px
            small[0] = False
            small[border] = False
            out |= small[holes]
    if min_object_px > 0:
        objects, n = ndimage.label(out)
        if n:
            sizes = np.bincount(objects.ravel())
            keep = sizes >= min_object_px
            keep[0] = False
            out = keep[objects]
    if grow_px > 0 and out.any():
        out = ndimage.binary_dilation(out, np.ones((3, 3), bool), iterations=grow_px)
    return out


def tissue_mask(
    rgb: np.ndarray,
    *,
    threshold: float | None = None,
    threshold_range: tuple[float, float] = (0.05, 0.15),
    min_object_px: int = 16,
    max_hole_px: int = 64,
    grow_px: int = 2,
    sizes_at: int | None = None,
) -> np.ndarray:
    """Stained tissue (H&E, IHC) in a low-resolution ``(y, x, 3)`` brightfield image.

    Glass is nearly grey (saturation ~0.02 on a white-balanced scan), stained tissue is not
    (eosin pink ~0.3, hematoxylin purple more). The threshold on :func:`saturation` is
    Otsu's, clamped to ``threshold_range``: an image that is all glass (Otsu splits the
    noise) or all tissue (Otsu splits pale from dense stain) keeps a sensible cut. Then
    :func:`clean_mask` with ``min_object_px``, ``max_hole_px`` and ``grow_px`` (pixels of
    this image; with ``sizes_at``, of an image of that longer side: a smaller one scales
    them down with its side, areas by its square, so they stay the same fraction of the
    image and a small image's tissue is not taken for dust). Pass ``threshold`` to skip Otsu.

    Returns
    -------
    numpy.ndarray
        ``(y, x)`` bool, True on tissue.

    Examples
    --------
    >>> glass = np.full((32, 32, 3), 245, np.uint8)
    >>> glass[8:24, 8:24] = (230, 120, 200)  # eosin-pink tissue
    >>> m = tissue_mask(glass, grow_px=0)
    >>> int(m.sum()), bool(m[8:24, 8:24].all())
    (256, True)
    >>> int(tissue_mask(np.full((8, 8, 3), 245, np.uint8)).sum())  # all glass
    0
    >>> pink = np.full((3, 3, 3), (230, 120, 200), np.uint8)
    >>> int(tissue_mask(pink).sum()), int(tissue_mask(pink, sizes_at=1024).sum())
    (0, 9)
    """
    if sizes_at is not None and (f := max(rgb.shape[:2]) / sizes_at) < 1:
        min_object_px, max_hole_px = round(min_object_px * f * f), round(max_hole_px * f * f)
        grow_px = round(grow_px * f)
    sat = saturation(rgb)
    lo, hi = threshold_range
    cut = threshold if threshold is not None else min(max(otsu_threshold(sat), lo), hi)
    return clean_mask(
        sat > cut, min_object_px=min_object_px, max_hole_px=max_hole_px, grow_px=grow_px
    )


def block_mean(block: np.ndarray, f: int) -> np.ndarray:
    """Mean of each ``f x f`` block of ``(y, x, C)``, float32; a partial last block averages
    what it has.

    >>> block_mean(np.arange(6.0).reshape(2, 3, 1), 2)[..., 0].tolist()
    [[2.0, 3.5]]
    """
    h, w = block.shape[:2]
    ny, nx = -(-h // f), -(-w // f)
    padded = np.zeros((ny * f, nx * f, *block.shape[2:]), dtype=np.float32)
    padded[:h, :w] = block
    sums = padded.reshape(ny, f, nx, f, *block.shape[2:]).sum(axis=(1, 3))
    counts = np.outer(np.minimum(f, h - f * np.arange(ny)), np.minimum(f, w - f * np.arange(nx)))
    return (sums / counts.reshape(ny, nx, *([1] * (block.ndim - 2)))).astype(np.float32)
