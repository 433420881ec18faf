"""The pixels a model is given: the channels it takes, nodata as its scaling's 0, and float
pixels it cannot take refused naming the file."""

from __future__ import annotations

import numpy as np

from segpipe.geometry.tiling import Box
from segpipe.io.readers import ImageReadError, Reader
from segpipe.io.readers.masks import pixel_valid_mask, valid_mask
from segpipe.models import PixelContract
from segpipe.models.contract import scaling_affine

__all__ = ["model_pixels"]

# segpipe's float pixel convention is [0, 1] (geometry.pixels.to_float01); a little slack for
# resampling overshoot, none for [0, 255] data stored as float.
_FLOAT_RANGE = (-0.01, 1.01)


def model_pixels(
    raw: np.ndarray,
    reader: Reader,
    box: Box,
    level: int,
    contract: PixelContract | None,
    channels: int | None,
) -> np.ndarray:
    """The ``(y, x, C)`` pixels of ``box`` (mirrored, all the file's channels) the model takes:
    its leading ``channels``, with the value the model's scaling maps to 0 (its stand-in) at
    every pixel a nodata value marks, and at pixels a mask band or alpha marks invalid whose
    float values it cannot take. Float pixels it cannot take anywhere else (NaN or infinite;
    outside [0, 1] where it takes floats as they are: no ``contract``, or its dtype rule) are
    refused naming file and region.
    """
    pixels = raw[..., :channels]
    refused = _refused(pixels, contract)
    kind = getattr(reader, "mask_kind", None)
    if kind is not None and (kind == "nodata" or refused.any()):
        valid = _valid(raw, reader, box, level, kind)
        # A nodata value is a sentinel, not a colour: NaN and -9999 must reach a model alike.
        # Under a mask band or alpha the colours are the file's own (many exports keep them).
        replaced = ~valid[..., None] if kind == "nodata" else refused & ~valid[..., None]
        if replaced.any():
            stand_in, _ = scaling_affine(contract, pixels.dtype)
            if pixels.dtype.kind != "f":
                info = np.iinfo(pixels.dtype)
                stand_in = np.clip(np.rint(stand_in), info.min, info.max)
            # a new array, as the read may be a view of the reader's own (read_mirrored)
            pixels = np.where(replaced, stand_in.astype(pixels.dtype), pixels)
            refused &= ~replaced
    if not refused.any():
        return pixels
    # In the image: the box runs into the mirrored halo past its edges (y -44:304).
    ny, nx = reader.level_shapes[level][:2]
    ys, xs = np.nonzero(refused.any(axis=-1))
    ys, xs = ys + box.y0, xs + box.x0
    inside = np.flatnonzero((ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx))[:1]
    where = f"y {max(box.y0, 0)}:{min(box.y1, ny)}, x {max(box.x0, 0)}:{min(box.x1, nx)}"
    where += f" of level {level}" + "".join(f" (first at y {ys[i]}, x {xs[i]})" for i in inside)
    if not np.isfinite(pixels[refused]).all():
        raise ImageReadError(
            f"{reader.path}: NaN or infinite pixels at {where} that the file does not mark "
            "invalid (nodata, mask, alpha); fill them or declare them nodata first"
        )
    raise ImageReadError(
        f"{reader.path}: float pixels must lie in [0, 1], found {pixels[refused].min():g}.."
        f"{pixels[refused].max():g} at {where}; rescale them to [0, 1] or store integers"
    )


def _refused(pixels: np.ndarray, contract: PixelContract | None) -> np.ndarray:
    """``pixels``' shape, bool: the values the model cannot take (only floats can be)."""
    if pixels.dtype.kind != "f":
        return np.zeros(pixels.shape, bool)
    if contract is None or contract.scaling == "dtype":  # floats as they are
        lo, hi = _FLOAT_RANGE
        return ~((pixels >= lo) & (pixels <= hi))
    return ~np.isfinite(pixels)


def _valid(raw: np.ndarray, reader: Reader, box: Box, level: int, kind: str) -> np.ndarray:
    """``(y, x)`` bool of ``box``: True where the file holds data. Nodata and alpha from the
    pixels in hand (one read, not two), a mask band read."""
    if kind in ("nodata", "alpha"):
        nodata, names = getattr(reader, "nodata", None), getattr(reader, "channel_names", None)
        valid = pixel_valid_mask(raw, nodata, kind, names)
        if valid is not None:
            return valid
    return valid_mask(reader, box, level)
