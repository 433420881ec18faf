"""The pixel contract: what a model was trained on, applied the same way at inference.

A :class:`PixelContract` records the channels a model takes, the pixel dtype and how its values
map to the model's ``[0, 1]`` input (a fixed range per channel, e.g. ``0..4095`` for a 12-bit
camera, measured from training-set percentiles, or the dtype's own range), the statistics of the
scaled training pixels, and the pixel size. It travels in the checkpoint; training samples
(:mod:`segpipe.training.sampling`) and the predictor (:mod:`segpipe.execution.predictor`) both
scale pixels with :meth:`PixelContract.scale`, the one place that does it.

>>> import numpy as np
>>> c = PixelContract(channels=1, dtype="uint16", scaling="range", lo=(0.0,), hi=(4095.0,))
>>> c.scale(np.array([[[0], [4095]]], dtype=np.uint16))[..., 0].tolist()
[[0.0, 1.0]]

Pure numpy; the checks take anything shaped like a reader (``level_shapes``, ``dtype``,
``pixel_size_um``, ``read``, maybe ``channel_names``) without importing :mod:`segpipe.io`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from segpipe.geometry.pixels import to_float01, unit_scale

__all__ = [
    "OutOfDistributionWarning",
    "PixelContract",
    "PixelContractError",
    "channels_taken",
    "check_source",
    "choose_level",
    "measure_contract",
    "scaling_affine",
]

Scaling = Literal["dtype", "range", "percentile"]
_SCALINGS = ("dtype", "range", "percentile")
_CHANNEL_WORDS = {1: "one channel (grey)", 3: "3 channels (RGB)", 4: "4 channels"}


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
        (0.25: 0.4 to 0.625 µm for a 0.5 µm model).
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
    to ``max_samples`` pixels per image, evenly strided, so the result is deterministic.

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
    samples = np.concatenate([_strided(i, max_samples, channels) for i in images])
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


def _strided(image: np.ndarray, max_samples: int, channels: int) -> np.ndarray:
    flat = image.reshape(-1, channels)
    step = max(1, math.ceil(len(flat) / max_samples))
    return flat[::step]


# -- inference-side checks --------------------------------------------------------------------


def level_pixel_sizes(reader: Any) -> list[float | None]:
    """Micrometres per pixel of each level of a reader (None when the file does not say)."""
    px = reader.pixel_size_um
    y0 = reader.level_shapes[0][0]
    return [None if px is None else px * y0 / shape[0] for shape in reader.level_shapes]


def choose_level(contract: PixelContract | None, reader: Any) -> int:
    """The pyramid level whose pixel size is closest (in ratio) to the model's; level 0 when
    the model's or the image's pixel size is unknown.

    >>> class R:
    ...     pixel_size_um, level_shapes = 0.25, ((800, 800, 3), (400, 400, 3), (200, 200, 3))
    >>> choose_level(PixelContract(channels=3, pixel_size_um=0.5), R())
    1
    """
    sizes = level_pixel_sizes(reader)
    if contract is None or contract.pixel_size_um is None or sizes[0] is None:
        return 0
    target = contract.pixel_size_um
    return min(range(len(sizes)), key=lambda k: abs(math.log(float(sizes[k] or 1.0) / target)))


def channels_taken(contract: PixelContract | None, reader: Any, level: int = 0) -> int:
    """How many leading channels of ``reader``'s ``level`` the model takes: all, or all but
    the last where that is the image's alpha (named ``"alpha"``) and the model takes one fewer.

    An alpha marks which pixels hold data (``valid_mask``), it is no image content: an RGB
    model segments an RGBA PNG or GeoTIFF as its RGB, whatever ``mask_kind`` says (None for
    an opaque PNG alpha). A model trained on RGBA keeps it.

    >>> class R:
    ...     level_shapes, channel_names = ((8, 8, 4),), ("red", "green", "blue", "alpha")
    >>> [channels_taken(PixelContract(channels=c), R()) for c in (3, 4)]
    [3, 4]
    """
    channels = int(reader.level_shapes[level][2])
    names = tuple(getattr(reader, "channel_names", None) or ())
    is_alpha_last = len(names) == channels and names[-1:] == ("alpha",)
    if contract is not None and is_alpha_last and contract.channels == channels - 1:
        return channels - 1
    return channels


def check_source(
    contract: PixelContract | None,
    reader: Any,
    level: int,
    *,
    model: str,
    level_fixed: bool = False,
) -> None:
    """Refuse, before any work, an image the model cannot take; warn when it looks unlike the
    training data.

    Raises :class:`PixelContractError` for a wrong channel count, a dtype the model's fixed
    value range does not fit, or a level whose pixel size differs from the model's by more
    than the tolerance. Warns (:class:`OutOfDistributionWarning`) when the pixel size is
    unknown on one side, or a sample of the image is far from the training statistics.
    A None contract (a plain module that does not say what it takes) checks nothing. An
    alpha the model does not take is left out (:func:`channels_taken`).
    """
    if contract is None:
        return
    path = reader.path
    channels = reader.level_shapes[level][2]
    if channels_taken(contract, reader, level) != contract.channels:
        names = f" ({', '.join(contract.channel_names)})" if contract.channel_names else ""
        raise PixelContractError(
            f"{path} has {_CHANNEL_WORDS.get(channels, f'{channels} channels')} but model "
            f"{model!r} was trained on {contract.channels}{names}: give it an image with "
            f"{contract.channels} channel(s) (convert or select bands first), or use or train "
            f"a model for {channels}-channel images (segpipe train --dataset folder ...)"
        )
    dtype = np.dtype(reader.dtype)
    if contract.scaling != "dtype" and contract.dtype is not None and dtype.name != contract.dtype:
        raise PixelContractError(
            f"{path} stores {dtype} pixels but model {model!r} was trained on {contract.dtype} "
            f"pixels scaled {contract.describe_scaling()}; those numbers would mean something "
            f"else here. Convert the image to {contract.dtype} or retrain on {dtype} data"
        )
    sizes = level_pixel_sizes(reader)
    want, have = contract.pixel_size_um, sizes[level]
    if want is not None and have is not None:
        ratio = have / want
        if abs(ratio - 1) > contract.pixel_size_tolerance:
            options = ", ".join(
                f"level {k}: {s:.4g} µm" for k, s in enumerate(sizes) if s is not None
            )
            how = "you fixed" if level_fixed else "the closest the image has"
            raise PixelContractError(
                f"{path} level {level} has {have:.4g} µm pixels ({how}), model {model!r} was "
                f"trained at {want:.4g} µm (tolerance ±{contract.pixel_size_tolerance:.0%}); "
                f"levels: {options}. Pick a level near {want:.4g} µm (--level), build one "
                f"(segpipe ingest makes a 2x pyramid), or, if the file's pixel size is wrong, "
                f"give the right one with --pixel-size"
            )
    elif want is not None:
        warnings.warn(
            f"{path}: pixel size unknown; model {model!r} was trained at {want:.4g} µm/px. "
            "Pass --pixel-size if you know it, so a matching level can be chosen",
            OutOfDistributionWarning,
            stacklevel=2,
        )
    if contract.mean is not None and contract.std is not None:
        _warn_if_unusual(contract, reader, model)


def _warn_if_unusual(contract: PixelContract, reader: Any, model: str) -> None:
    """Compare a small sample (the centre of the smallest level) with the training statistics."""
    k = len(reader.level_shapes) - 1
    ny, nx, _ = reader.level_shapes[k]
    side = 512
    y0, x0 = max(0, (ny - side) // 2), max(0, (nx - side) // 2)
    sample = reader.read(y0, min(ny, y0 + side), x0, min(nx, x0 + side), k)
    scaled = contract.scale(sample[..., : channels_taken(contract, reader, k)])  # no alpha
    mean = np.asarray(scaled, dtype=np.float64).reshape(-1, contract.channels).mean(axis=0)
    far = [
        f"channel {c}: mean {mean[c]:.3g} vs {contract.mean[c]:.3g} ± {contract.std[c]:.3g}"
        for c in range(contract.channels)
        if contract.mean is not None
        and contract.std is not None
        and abs(mean[c] - contract.mean[c]) > 3 * contract.std[c]
    ]
    if far:
        warnings.warn(
            f"{reader.path}: intensities unlike model {model!r}'s training data "
            f"({'; '.join(far)}, after scaling {contract.describe_scaling()}); results may be "
            "poor. Check the image's bit depth and staining, or retrain on such images",
            OutOfDistributionWarning,
            stacklevel=3,
        )
