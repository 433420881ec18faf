"""The pixel contract: what a model was trained on, applied the same way at inference.

A :class:`PixelContract` records the channels a model takes, the pixel dtype and how its values
map to the model's ``[0, 1]`` input (a fixed range per channel, e.g. ``0..4095`` for a 12-bit
camera, measured from training-set percentiles, or the dtype's own range), the statistics of the
scaled training pixels, and the pixel size. It travels in the checkpoint; training samples
(:mod:`segpipe.training.sampling`) and the predictor (:mod:`segpipe.execution.predictor`) both
scale pixels with :meth:`PixelContract.scale`, the one place that does it. An image is checked
against it before any work by :mod:`segpipe.models.source_checks`.

>>> import numpy as np
>>> c = PixelContract(channels=1, dtype="uint16", scaling="range", lo=(0.0,), hi=(4095.0,))
>>> c.scale(np.array([[[0], [4095]]], dtype=np.uint16))[..., 0].tolist()
[[0.0, 1.0]]

Pure numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from segpipe.geometry.pixels import to_float01, unit_scale

__all__ = [
    "OutOfDistributionWarning",
    "PixelContract",
    "PixelContractError",
    "measure_contract",
    "sampled_pixels",
    "scaling_affine",
]

Scaling = Literal["dtype", "range", "percentile"]
_SCALINGS = ("dtype", "range", "percentile")


class PixelContractError(ValueError):
    """An image the model cannot take; the message names the file, the model and the fix."""


class OutOfDistributionWarning(UserWarning):
    """An image unlike the model's training data (pixel size, intensities)."""


def scaling_affine(
    contract: PixelContract | None, dtype: np.dtype[Any] | type
) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, span)`` float32, per channel (or one for all): what scaling pixels of ``dtype``
    by ``contract`` (None, or ``scaling="dtype"``: the dtype rule) computes, as
    ``(x - lo) / span`` in float32, bit for bit. For a device that scales raw pixels itself.

    >>> scaling_affine(None, np.uint8)
    (array([0.], dtype=float32), array([255.], dtype=float32))
    """
    if contract is None or contract.lo is None or contract.hi is None:
        return np.zeros(1, np.float32), np.full(1, unit_scale(dtype), np.float32)
    lo = np.asarray(contract.lo, dtype=np.float32)
    return lo, np.asarray(contract.hi, dtype=np.float32) - lo


@dataclass(frozen=True)
class PixelContract:
    """What a model takes: channels, dtype, value scaling, statistics and pixel size.

    Parameters
    ----------
    channels
        Channels (bands) per pixel.
    channel_names
        One name per channel, or None.
    dtype
        numpy dtype name of the training pixels (``"uint8"``, ``"uint16"``, ``"float32"``);
        None: any (models saved before contracts existed).
    scaling
        How ``lo``/``hi`` were set: ``"dtype"`` (none: integers divided by their dtype's
        maximum, floats as they are, :func:`~segpipe.geometry.pixels.to_float01`), ``"range"``
        (given) or ``"percentile"`` (measured on the training pixels).
    lo, hi
        Per channel, the native values mapped to 0 and 1 (values beyond are not clipped);
        None with ``scaling="dtype"``.
    percentiles
        The percentiles ``lo``/``hi`` were measured at, for ``scaling="percentile"``.
    mean, std
        Per-channel mean and std of the **scaled** training pixels, or None (not measured);
        inference warns when an image's statistics lie far outside them.
    pixel_size_um
        Micrometres per pixel of the training images, None when unknown.
    pixel_size_tolerance
        Relative difference of an image's pixel size from ``pixel_size_um`` that is accepted
        (0.25: 0.375 to 0.625 µm for a 0.5 µm model).
    """

    channels: int
    channel_names: tuple[str, ...] | None = None
    dtype: str | None = None
    scaling: Scaling = "dtype"
    lo: tuple[float, ...] | None = None
    hi: tuple[float, ...] | None = None
    percentiles: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pixel_size_um: float | None = None
    pixel_size_tolerance: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int):
            raise ValueError(f"PixelContract.channels must be an integer, got {self.channels!r}")
        if self.channels < 1:
            raise ValueError(f"PixelContract.channels must be >= 1, got {self.channels}")
        if self.scaling not in _SCALINGS:
            raise ValueError(
                f"PixelContract.scaling must be one of {_SCALINGS}, got {self.scaling!r}"
            )
        if self.dtype is not None:
            unit_scale(self.dtype)  # refuses complex, strings, objects
        for name in ("channel_names", "lo", "hi", "mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.channels:
                raise ValueError(
                    f"PixelContract.{name} needs {self.channels} values (one per channel), "
                    f"got {value!r}"
                )
        for name in ("lo", "hi", "percentiles", "mean", "std"):
            value = getattr(self, name)
            # NaN passes every comparison below as false, inf some: scaled pixels would be NaN.
            if value is not None and not all(math.isfinite(v) for v in value):
                raise ValueError(f"PixelContract.{name} must be finite numbers, got {value!r}")
        if (self.lo is None) != (self.hi is None) or (self.lo is None) != (self.scaling == "dtype"):
            raise ValueError(
                f"PixelContract: scaling {self.scaling!r} needs lo and hi exactly when it is not "
                f"'dtype', got lo={self.lo!r}, hi={self.hi!r}"
            )
        if (
            self.lo is not None
            and self.hi is not None
            and any(not (h > lo) for lo, h in zip(self.lo, self.hi, strict=True))
        ):
            raise ValueError(
                f"PixelContract needs hi > lo for every channel, got lo={self.lo}, "
                f"hi={self.hi} (a constant channel: give its range with scaling='range')"
            )
        if self.std is not None and any(not (s > 0) for s in self.std):
            raise ValueError(f"PixelContract.std must be > 0 for every channel, got {self.std}")
        px = self.pixel_size_um
        if px is not None and not (math.isfinite(px) and px > 0):
            raise ValueError(f"PixelContract.pixel_size_um must be > 0 or None, got {px!r}")
        if not (self.pixel_size_tolerance >= 0):
            raise ValueError(
                f"PixelContract.pixel_size_tolerance must be >= 0, got {self.pixel_size_tolerance}"
            )

    # -- applying it ----------------------------------------------------------------------

    def scale(self, pixels: Any) -> Any:
        """``(..., C)`` pixels (numpy or dask, native dtype) as float32 model input.

        ``(x - lo) / (hi - lo)`` per channel, or :func:`~segpipe.geometry.pixels.to_float01`
        for ``scaling="dtype"``.
        """
        if self.lo is None or self.hi is None:
            return to_float01(pixels)
        lo, span = scaling_affine(self, pixels.dtype)
        return (pixels.astype(np.float32, copy=False) - lo) / span

    def describe_scaling(self) -> str:
        """The scaling in words, for messages and reports."""
        if self.scaling == "dtype":
            return "values divided by their dtype's maximum (floats as they are)"
        ranges = ", ".join(
            f"{lo:g}..{hi:g}" for lo, hi in zip(self.lo or (), self.hi or (), strict=True)
        )
        how = (
            f"percentiles {self.percentiles} of the training pixels"
            if self.percentiles
            else "given"
        )
        return f"{ranges} mapped to 0..1 ({how})"

    # -- plain data -----------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists for tuples), for checkpoints and JSON sidecars."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PixelContract:
        """Parse :meth:`as_dict`'s output (or a hand-written sidecar); unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pixel contract entries {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = dict(data)
        for name in ("channel_names", "lo", "hi", "percentiles", "mean", "std"):
            if values.get(name) is not None:
                cast = str if name == "channel_names" else float
                values[name] = tuple(cast(v) for v in values[name])
        return cls(**values)


def measure_contract(
    images: Sequence[np.ndarray],
    *,
    scaling: Literal["auto", "dtype", "range", "percentile"] = "auto",
    value_range: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    pixel_size_um: float | None = None,
    channel_names: Sequence[str] | None = None,
    max_samples: int = 1_000_000,
) -> PixelContract:
    """The contract of a training set of ``(Y, X, C)`` images (one dtype, one channel count).

    ``scaling="auto"`` keeps the dtype rule for uint8 and for floats within ``[0, 1]``, and
    measures ``percentiles`` per channel otherwise (16-bit cameras rarely fill 0..65535).
    ``"range"`` maps ``value_range`` onto 0..1 for every channel. Statistics are taken on up
    to ``max_samples`` pixels per image, one drawn with a fixed seed from each of as many
    equal runs of its pixels, so the result is deterministic and no column pattern skews it.

    >>> img = np.arange(4096, dtype=np.uint16).reshape(64, 64, 1)
    >>> c = measure_contract([img], percentiles=(0, 100))
    >>> c.scaling, c.lo, c.hi, c.dtype
    ('percentile', (0.0,), (4095.0,), 'uint16')
    """
    if not images:
        raise ValueError("measure_contract needs at least one image")
    dtypes = {np.dtype(i.dtype).name for i in images}
    counts = {int(i.shape[2]) if i.ndim == 3 else 1 for i in images}
    if len(dtypes) != 1 or len(counts) != 1:
        raise ValueError(
            f"training images must share one dtype and one channel count, got dtypes "
            f"{sorted(dtypes)} and channel counts {sorted(counts)}"
        )
    dtype, channels = dtypes.pop(), counts.pop()
    samples = np.concatenate([sampled_pixels(i, max_samples, channels) for i in images])
    # NaN and inf (a float raster's no-data) say nothing of the values: measure the pixels
    # finite in every channel, and refuse a channel that has none.
    finite = np.isfinite(samples)
    if not finite.all():
        empty = [c for c in range(channels) if not finite[:, c].any()]
        samples = samples[finite.all(axis=1)]
        if empty or not len(samples):
            raise ValueError(
                f"the training images have no pixel with finite values in every channel "
                f"(channels with none, all NaN or infinite: {empty}); drop channels without "
                "data, or fill their no-data pixels"
            )
    if scaling == "auto":
        in_unit = np.dtype(dtype).kind == "f" and samples.min() >= 0 and samples.max() <= 1
        scaling = (
            "dtype" if dtype == "uint8" or np.dtype(dtype).kind == "b" or in_unit else "percentile"
        )
    lo = hi = None
    if scaling == "range":
        if value_range is None:
            raise ValueError("scaling='range' needs value_range=(lo, hi)")
        lo, hi = (float(value_range[0]),) * channels, (float(value_range[1]),) * channels
    elif scaling == "percentile":
        p = np.percentile(samples.astype(np.float64), percentiles, axis=0)
        lo, hi = tuple(float(v) for v in p[0]), tuple(float(v) for v in p[1])
        # A flat channel (all one value) has no spread to scale by: map it onto 0..1 by its
        # dtype's range instead of dividing by zero.
        hi = tuple(h if h > lo_ else lo_ + unit_scale(dtype) for lo_, h in zip(lo, hi, strict=True))
    elif scaling != "dtype":
        raise ValueError(
            f"scaling must be 'auto', 'dtype', 'range' or 'percentile', got {scaling!r}"
        )
    base = PixelContract(
        channels=channels,
        channel_names=None if channel_names is None else tuple(str(c) for c in channel_names),
        dtype=dtype,
        scaling=scaling,
        lo=lo,
        hi=hi,
        percentiles=(float(percentiles[0]), float(percentiles[1]))
        if scaling == "percentile"
        else None,
        pixel_size_um=pixel_size_um,
    )
    scaled = np.asarray(base.scale(samples), dtype=np.float64)
    mean = tuple(float(m) for m in scaled.mean(axis=0))
    std = tuple(max(float(s), 1e-3) for s in scaled.std(axis=0))
    return dataclasses.replace(base, mean=mean, std=std)


def sampled_pixels(image: Any, max_samples: int, channels: int) -> np.ndarray:
    """``(n, channels)`` pixels of ``image``: all of them, or one drawn (a fixed seed) from
    each of ``max_samples`` equal runs of its pixels in row-major order.

    Not every ``k``-th pixel: where ``k`` divides the width that is the same columns of
    every row, and a column pattern (stripes, a camera's odd/even readout) is measured from
    a part of it. Drawing within each run keeps the sample deterministic, spread over the
    whole image, and never more than ``max_samples``; a dask image gives only those pixels.
    """
    ny, nx = int(image.shape[0]), int(image.shape[1])
    n, m = ny * nx, max(1, int(max_samples))
    if n <= m:
        return np.asarray(image).reshape(-1, channels)
    # Run edges n * i // m, without forming n * i (which overflows int64 on huge images).
    q, r = divmod(n, m)
    i = np.arange(m + 1, dtype=np.int64)
    edges = i * q + i * r // m
    rng = np.random.default_rng(0)
    ys, xs = np.divmod(edges[:-1] + rng.integers(0, np.diff(edges)), nx)
    picked = image.vindex[ys, xs] if hasattr(image, "vindex") else np.asarray(image)[ys, xs]
    return np.asarray(picked).reshape(-1, channels)
