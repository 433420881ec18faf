"""From a model's float probabilities to the values a result stores: the stored dtype
(:func:`encode_probabilities`), the argmax mask (:func:`class_map`), and the float16 casts both
the tasks and the pyramid need, fast and rounded as numpy rounds (:func:`as_float16`).

numpy casts to float16 one value at a time where the value is below float16's normal range
(softmax tails: about half of them): 120 ms per (3, 1024, 1024) block from float32, where
torch's vectorised cast gives the same bits in 2 ms. torch is imported in the functions:
reading results needs no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_float16", "as_float32", "class_map", "encode_probabilities"]


def encode_probabilities(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    """Float probabilities in the stored dtype (uint8: ``round(p * 255)``).

    The mask (level 0) is the argmax of the float32 probabilities (:func:`class_map`),
    taken before they are encoded. Rounding to float16 or uint8 can make near-equal classes
    equal, so the argmax of the stored probabilities may differ from the mask on such
    near-ties (``[0.4999, 0.5001]``, mask 1, is stored in float16 as ``[0.5, 0.5]``, whose
    first-on-ties argmax is 0); rounding is monotone, so it is never a strict reversal: no
    stored class is above the mask's class at that pixel.

    >>> encode_probabilities(np.array([0.0, 0.5, 1.0]), "uint8").tolist()
    [0, 128, 255]
    """
    if dtype == "uint8":
        # In float64, where p * 255 of a float32 p is exact: float32's p / (1 / 255) rounded
        # twice, and stored 6 values a million one code low (just above a half).
        scaled = np.clip(probabilities, 0.0, 1.0).astype(np.float64) * 255
        return np.rint(scaled).astype(np.uint8)
    if dtype == "float16" and probabilities.dtype in (np.float32, np.float64):
        return as_float16(probabilities)
    return probabilities.astype(dtype)


def as_float16(values: np.ndarray) -> np.ndarray:
    """float32 or float64 ``values`` rounded to float16 (to nearest, ties to even), bit for
    bit as ``values.astype(np.float16)``; C-contiguous.

    float64 is first rounded to float32 *to odd* (toward zero, the last bit set where that
    was inexact), then to float16 to nearest: with 13 bits more than float16, that rounds as
    one rounding would (Boldo and Melquiond, 2008). Two roundings to nearest (torch's own
    float64 cast goes through float32 so) can land one ulp off, on a value just past a
    float16 midpoint.

    >>> as_float16(np.array([0.5 + 2**-12 + 2**-26])).item() == 0.5 + 2**-11
    True
    """
    import torch

    if values.dtype == np.float64:
        values = _float32_to_odd(values)
    elif values.dtype != np.float32:
        raise TypeError(f"as_float16 takes float32 or float64 values, got {values.dtype}")
    half = _as_tensor(values).to(torch.float16, memory_format=torch.contiguous_format)
    return half.numpy()


def as_float32(values: np.ndarray) -> np.ndarray:
    """float16 ``values`` as float32 (exact), C-contiguous: numpy's cast takes 4x as long."""
    import torch

    if values.dtype != np.float16:
        raise TypeError(f"as_float32 takes float16 values, got {values.dtype}")
    return _as_tensor(values).to(torch.float32, memory_format=torch.contiguous_format).numpy()


def _as_tensor(values: np.ndarray) -> Any:
    import torch

    # torch reads a strided view (a window's crop) as it is, no contiguous copy first; it
    # takes no negative strides (a reversed view) and warns on read-only memory.
    if min(values.strides, default=0) < 0 or not values.flags.writeable:
        values = np.array(values, order="C")  # a writeable copy
    return torch.from_numpy(values)


def _float32_to_odd(values: np.ndarray) -> np.ndarray:
    """float64 ``values`` rounded to float32 to odd: the float32 next toward zero, its lowest
    bit set, wherever the value is not a float32."""
    with np.errstate(over="ignore"):  # a float64 past float32's range: inf, as numpy's cast
        rounded = values.astype(np.float32)
    back = rounded.astype(np.float64)
    inexact = back != values  # NaN too: a NaN with its lowest bit set is still NaN
    bits = rounded.view(np.uint32)  # sign and magnitude: minus one is one step toward zero
    bits -= (inexact & (np.abs(back) > np.abs(values))).view(np.uint8)
    bits |= inexact.view(np.uint8)
    return rounded


def class_map(probabilities: np.ndarray) -> np.ndarray:
    """``(y, x)`` uint8 index of each pixel's most probable class in ``(C, y, x)``
    probabilities, the first on ties: ``np.argmax(probabilities, axis=0)``, twice as fast
    (one pass per class instead of a strided reduction).

    >>> class_map(np.array([[[0.2, 0.5]], [[0.7, 0.5]], [[0.1, 0.0]]])).tolist()
    [[1, 0]]
    """
    best = probabilities[0]
    index = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, probabilities.shape[0]):
        higher = probabilities[c] > best
        index[higher] = c
        best = np.maximum(best, probabilities[c])
    return index
