"""An image source against a model's pixel contract, before any work: the pyramid level to
segment, the channels the model takes, and whether it can take the image at all.

Pure numpy; the checks take anything shaped like a reader (``level_shapes``, ``dtype``,
``pixel_size_um``, ``read``, maybe ``channel_names``) without importing :mod:`segpipe.io`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from segpipe.models.contract import OutOfDistributionWarning, PixelContract, PixelContractError

__all__ = ["channels_taken", "check_source", "choose_level", "level_pixel_sizes"]

_CHANNEL_WORDS = {1: "one channel (grey)", 3: "3 channels (RGB)", 4: "4 channels"}


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
    trained = None if contract.dtype is None else np.dtype(contract.dtype)
    # A float's width does not change what its numbers mean (all are scaled as float32); an
    # integer's does (12-bit counts in uint16 are not 8-bit ones).
    alike = trained is None or dtype == trained or dtype.kind == trained.kind == "f"
    if contract.scaling != "dtype" and not alike:
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
