"""Pixel layout and value normalisation: the one place that knows axis letters and dtypes.

Pure array code on numpy or dask arrays (anything with ``shape``, ``dtype``, ``transpose``
and basic indexing); no I/O. Every reader hands its native array and the file's axis letters
to :func:`to_yxc`, so the rest of segpipe only ever sees ``(Y, X, C)``.

Axis letters follow tifffile and OME: ``Y``, ``X`` space, ``C`` channel, ``S`` samples (RGB
interleaved in a TIFF page, treated as ``C``), ``T`` time, ``Z`` focus; any other letter is a
non-spatial axis that must have length 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import numpy as np

__all__ = [
    "downsample_mean_2x",
    "exact_sum_dtype",
    "level_downsample",
    "pyramid_shapes",
    "to_float01",
    "to_yxc",
    "unit_scale",
    "valid_mean_2x",
    "yxc_shape",
]

A = TypeVar("A")

_CHANNEL_LETTERS = "CS"


def _yxc_plan(shape: tuple[int, ...], axes: str) -> tuple[tuple[Any, ...], tuple[int, ...], bool]:
    """Index, transpose order and whether to append a channel axis, for ``to_yxc``."""
    letters = axes.upper()
    shape = tuple(int(n) for n in shape)
    if len(letters) != len(shape):
        raise ValueError(
            f"axes {axes!r} name {len(letters)} axes but the array has shape {shape} "
            f"({len(shape)} axes)"
        )
    if len(set(letters)) != len(letters) or "Y" not in letters or "X" not in letters:
        raise ValueError(
            f"axes {axes!r} (shape {shape}) must name Y and X once each, and no letter twice"
        )
    sizes = dict(zip(letters, shape, strict=True))
    channels = [a for a in _CHANNEL_LETTERS if a in sizes]
    # A TIFF may carry both C (OME channels) and S (samples); one of them must be singleton.
    wide = [a for a in channels if sizes[a] > 1]
    if len(wide) > 1:
        raise ValueError(
            f"axes {axes!r} with shape {shape} have two channel axes longer than 1 (C and S); "
            f"segpipe takes one channel axis"
        )
    channel = wide[0] if wide else (channels[0] if channels else None)

    index: list[Any] = []
    kept: list[str] = []
    for letter, size in zip(letters, shape, strict=True):
        if letter in "YX" or letter == channel:
            index.append(slice(None))
            kept.append(letter)
        elif size == 1:
            index.append(0)
        else:
            raise ValueError(
                f"axes {axes!r} with shape {shape} have {letter}={size}: segpipe segments 2D "
                f"images, not stacks; export one {letter} plane (e.g. the best focus) first"
            )
    order = tuple(kept.index(a) for a in ("Y", "X", channel) if a is not None)
    return tuple(index), order, channel is None


def yxc_shape(shape: tuple[int, ...], axes: str) -> tuple[int, int, int]:
    """The ``(Y, X, C)`` shape :func:`to_yxc` gives for an array of ``shape`` and ``axes``.

    Raises
    ------
    ValueError
        As :func:`to_yxc`, without needing the array.

    Examples
    --------
    >>> yxc_shape((1, 3, 1, 300, 517), "TCZYX")
    (300, 517, 3)
    >>> yxc_shape((300, 517), "YX")
    (300, 517, 1)
    """
    index, order, add_c = _yxc_plan(tuple(shape), axes)
    kept = [int(n) for n, i in zip(shape, index, strict=True) if isinstance(i, slice)]
    yx_c = [kept[i] for i in order]
    if add_c:
        yx_c.append(1)
    return (yx_c[0], yx_c[1], yx_c[2])


def to_yxc(array: A, axes: str) -> A:
    """Reorder an image to ``(Y, X, C)``.

    Parameters
    ----------
    array
        numpy or dask array whose axes are named by ``axes``.
    axes
        One letter per axis of ``array``, e.g. ``"YXC"``, ``"YXS"`` (tifffile's samples),
        ``"CYX"``, ``"SYX"``, ``"YX"`` or ``"TCZYX"``. Case does not matter. Axes other than
        Y, X and the channel axis must have length 1 and are dropped.

    Returns
    -------
    array
        ``(Y, X, C)`` view of the same type as ``array`` (no copy for numpy); ``C == 1`` when
        ``axes`` has no channel axis.

    Raises
    ------
    ValueError
        Naming ``axes`` and the shape, when they disagree, Y or X is missing, or a
        non-channel axis (Z, T, ...) is longer than 1.

    Examples
    --------
    >>> to_yxc(np.zeros((3, 4, 5)), "CYX").shape
    (4, 5, 3)
    >>> to_yxc(np.zeros((1, 2, 1, 4, 5)), "TCZYX").shape
    (4, 5, 2)
    >>> to_yxc(np.zeros((4, 5)), "YX").shape
    (4, 5, 1)
    """
    shape = tuple(array.shape)  # type: ignore[attr-defined]
    index, order, add_c = _yxc_plan(shape, axes)
    out: Any = array[index] if any(not isinstance(i, slice) for i in index) else array  # type: ignore[index]
    if order != tuple(range(len(order))):
        out = out.transpose(order)
    if add_c:
        out = out[..., None]
    return out


def unit_scale(dtype: np.dtype[Any] | type | str) -> float:
    """Divisor that maps a dtype's value range onto [0, 1].

    The integer types' maximum (255 for uint8, 65535 for uint16, 32767 for int16); 1.0 for
    floats (taken to be in [0, 1] already) and bool.

    Raises
    ------
    ValueError
        For complex, string, object or other non-real dtypes.

    Examples
    --------
    >>> unit_scale(np.uint8), unit_scale("uint16"), unit_scale(np.float32)
    (255.0, 65535.0, 1.0)
    """
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        return float(np.iinfo(dt).max)
    if dt.kind in "fb":
        return 1.0
    raise ValueError(
        f"dtype {dt} has no [0, 1] scale: segpipe takes bool, integer or real float pixels"
    )


def to_float01(array: A) -> A:
    """Pixel values as float32 in [0, 1] (integers divided by :func:`unit_scale`).

    Floats are passed through as float32 without rescaling; signed integers map their
    negative values below 0. Works lazily on dask arrays.

    Examples
    --------
    >>> to_float01(np.array([0, 51, 255], dtype=np.uint8))
    array([0. , 0.2, 1. ], dtype=float32)
    """
    dt = np.dtype(array.dtype)  # type: ignore[attr-defined]
    scale = unit_scale(dt)
    out = array.astype(np.float32, copy=False)  # type: ignore[attr-defined]
    if scale != 1.0:
        out = out / np.float32(scale)
    return out


def level_downsample(level0: int, n: int, *, overview_ratio: bool = False) -> float:
    """Level-0 pixels per pixel of a pyramid level ``n`` pixels long on an axis ``level0``
    long: the whole factor ``d`` it was made with, its side ``level0 // d`` or ``ceil(level0 /
    d)`` (517 -> 258 is a half, as the result pyramid's own levels are), else the size ratio.
    ``overview_ratio``: a level rounded up is the size ratio, as GDAL scales the transform of
    its overviews (which span the whole extent); one rounded down (an ingest's) stays ``d``.

    >>> level_downsample(517, 258), level_downsample(517, 259), level_downsample(100, 30)
    (2, 2, 3.3333333333333335)
    >>> level_downsample(1203, 18), level_downsample(1001, 501, overview_ratio=True)
    (64, 1.998003992015968)
    >>> level_downsample(33, 3), level_downsample(129, 3)
    (16, 64)
    """
    # A power of two first, the nearest and the two around the ratio: past a few levels the
    # ratio rounds to another whole factor that fits as well (1203 px, level 6: 18 px, a ratio
    # of 66.8, and ceil(1203 / 67) is 18; 33 px, a level of 3 px: 16, not 11).
    power = math.log2(level0 / n)
    twos = (2 ** round(power), 2 ** math.floor(power), 2 ** math.ceil(power))
    for d in (*twos, max(1, round(level0 / n))):
        if level0 // d == n or (not overview_ratio and -(-level0 // d) == n):
            return d
    return level0 / n


def pyramid_shapes(shape_yx: tuple[int, int], min_level_size: int) -> tuple[tuple[int, int], ...]:
    """``(Y, X)`` of each level of a 2x pyramid, level 0 first.

    Each level halves the previous one (odd sides drop their last row or column, as
    :func:`downsample_mean_2x` does). A level is added only while its smaller side is still
    ``>= min_level_size``; level 0 is always there.

    Examples
    --------
    >>> pyramid_shapes((300, 517), 64)
    ((300, 517), (150, 258), (75, 129))
    >>> pyramid_shapes((100, 100), 256)
    ((100, 100),)
    """
    if min_level_size < 1:
        raise ValueError(f"min_level_size must be >= 1 pixel, got {min_level_size}")
    y, x = (int(n) for n in shape_yx)
    shapes = [(y, x)]
    while min(y // 2, x // 2) >= min_level_size:
        y, x = y // 2, x // 2
        shapes.append((y, x))
    return tuple(shapes)


def downsample_mean_2x(
    array: A, *, yx_axes: tuple[int, int] = (0, 1), float32_sum: bool = False
) -> A:
    """Halve an image by averaging 2x2 pixel blocks; keeps the dtype.

    Parameters
    ----------
    array
        numpy or dask array; a dask array stays lazy (blocks are averaged per chunk, so
        chunks along ``yx_axes`` should have even sizes except the last).
    yx_axes
        Positions of the Y and X axes, ``(0, 1)`` for ``(Y, X, C)``, ``(1, 2)`` for
        ``(C, Y, X)``.
    float32_sum
        Sum float32 pixels in float32 rather than float64: three times faster, and within 2
        ulps of the exact mean for finite values of one sign (class probabilities); wrong
        for others (a block of float32 nodata, -3.4e38, overflows). Other dtypes ignore it.

    Returns
    -------
    array
        ``Y // 2, X // 2`` along ``yx_axes`` (an odd last row or column is dropped). Integers
        are rounded half up, bool is True where at least 2 of the 4 pixels are.

    Examples
    --------
    >>> downsample_mean_2x(np.array([[0, 1, 9], [2, 2, 9]], dtype=np.uint8))
    array([[1]], dtype=uint8)
    """
    dtype = np.dtype(array.dtype)  # type: ignore[attr-defined]
    if dtype.kind not in "uifb":
        raise ValueError(f"cannot average pixels of dtype {dtype}")
    ay, ax = yx_axes
    shape = tuple(array.shape)  # type: ignore[attr-defined]
    ny, nx = shape[ay] // 2, shape[ax] // 2
    if ny == 0 or nx == 0:
        raise ValueError(f"cannot halve an image of shape {shape} (Y or X side < 2)")
    index = [slice(None)] * len(shape)
    index[ay], index[ax] = slice(0, 2 * ny), slice(0, 2 * nx)
    trimmed = array[tuple(index)]  # type: ignore[index]
    if hasattr(trimmed, "map_blocks"):
        return _downsample_dask(trimmed, ay, ax, float32_sum)
    return cast(A, _downsample_numpy(trimmed, ay, ax, float32_sum))


def _downsample_numpy(array: np.ndarray, ay: int, ax: int, float32_sum: bool = False) -> np.ndarray:
    """2x2 block mean of an array with even Y and X sides."""

    def corner(dy: int, dx: int) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[ay], index[ax] = slice(dy, None, 2), slice(dx, None, 2)
        return array[tuple(index)]

    # The four corners added in place: a few times faster than a reshape and a sum over two
    # small axes, and exact for every integer and float16 input (float32: up to the last bit
    # of float64, unless summed in float32).
    f32 = float32_sum and array.dtype == np.float32
    total = np.dtype(np.float32) if f32 else exact_sum_dtype(array.dtype)
    summed = corner(0, 0).astype(total)
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        summed += corner(dy, dx)
    return _finish_mean(summed, out_dtype=array.dtype)


def _downsample_dask(array: Any, ay: int, ax: int, float32_sum: bool) -> Any:
    """Blockwise :func:`_downsample_numpy`; odd chunks are first merged into even ones."""
    chunks = list(array.chunks)
    for axis in (ay, ax):
        if any(c % 2 for c in chunks[axis]):
            # even chunks of about the old size; the side is even, so the last one is too
            size = max(2, 2 * round(max(chunks[axis]) / 2))
            chunks[axis] = size
    array = array.rechunk(tuple(chunks))
    out_chunks = tuple(
        tuple(c // 2 for c in cs) if axis in (ay, ax) else cs
        for axis, cs in enumerate(array.chunks)
    )
    return array.map_blocks(
        _downsample_numpy,
        ay,
        ax,
        float32_sum,
        chunks=out_chunks,
        dtype=array.dtype,
        meta=np.empty((0,) * array.ndim, array.dtype),
    )


def exact_sum_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """A type that holds the sum of four ``dtype`` values exactly (Python's integers for
    64-bit ones: four int64s overflow int64, and float64 rounds them)."""
    if dtype.kind in "ui" and dtype.itemsize == 8:
        return np.dtype(object)
    return np.dtype(np.int64) if dtype.kind in "uib" else np.dtype(np.float64)


def valid_mean_2x(
    block: np.ndarray, valid: np.ndarray, nodata: Sequence[float], *, off_nodata: bool = False
) -> np.ndarray:
    """2x2 mean of the ``valid`` (``(Y, X)`` bool) pixels of ``(C, Y, X)`` ``block`` with even
    sides, keeping its dtype (integers round half up); ``nodata`` (one per band) where a
    block has none. ``off_nodata``: a mean equal to ``nodata`` in every band moves one step
    off it in its first band (as GDAL's overviews do), so it still reads as valid.

    >>> valid_mean_2x(np.array([[[1, 0], [0, 0]]]), np.eye(2, dtype=bool), (0.0,)).tolist()
    [[[1]]]
    >>> valid_mean_2x(np.zeros((1, 2, 2), np.uint8), np.ones((2, 2), bool), (0.0,), off_nodata=True)
    array([[[1]]], dtype=uint8)
    """
    kind = block.dtype.kind
    data = np.where(valid, block, 0).astype(exact_sum_dtype(block.dtype))
    total = data[:, 0::2, 0::2] + data[:, 0::2, 1::2] + data[:, 1::2, 0::2] + data[:, 1::2, 1::2]
    count = valid.astype(np.int64)
    count = count[0::2, 0::2] + count[0::2, 1::2] + count[1::2, 0::2] + count[1::2, 1::2]
    n = np.maximum(count, 1)
    mean = (2 * total + n) // (2 * n) if kind in "uib" else total / n
    out = mean.astype(block.dtype)
    value = np.asarray(nodata, dtype=np.float64).astype(block.dtype)
    hit = (count > 0) & (out == value[:, None, None]).all(axis=0)
    if off_nodata and hit.any():
        v = value[0]
        if kind == "b":
            out[0, hit] = not v
        elif kind in "fc":
            out[0, hit] = np.nextafter(v, -np.inf if v == np.finfo(block.dtype).max else np.inf)
        else:
            out[0, hit] = v - 1 if v == np.iinfo(block.dtype).max else v + 1
    if (empty := count == 0).any():
        out[:, empty] = value[:, None]
    return out


def _finish_mean(summed: np.ndarray, *, out_dtype: np.dtype[Any]) -> np.ndarray:
    if out_dtype.kind == "b":
        return summed >= 2
    if out_dtype.kind in "ui":
        # (s + 2) // 4 rounds half up exactly, where float rounding would go to even
        return ((summed + 2) // 4).astype(out_dtype)
    summed *= 0.25  # exact: a power of two
    return summed.astype(out_dtype, copy=False)
