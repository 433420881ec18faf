"""The lecture's loss: pixel-wise softmax cross-entropy, and the U-Net paper's weight map.

``P_k(i, j) = softmax_k(s(i, j))`` and ``L(i, j) = -log P_truth(i, j)``; an optional weight
``w(i, j)`` multiplies each pixel's term. :func:`unet_weight_map` builds the paper's ``w`` from
instance labels, so that the thin gaps between touching objects weigh heavily.

Pure torch/numpy/scipy: no I/O, no models.

>>> logits = torch.zeros(1, 2, 1, 2)  # two classes, equal scores: P = 1/2 everywhere
>>> target = torch.tensor([[[0, 1]]])
>>> round(softmax_cross_entropy(logits, target).item(), 4)  # log 2
0.6931
>>> round(softmax_cross_entropy(logits, target, reduction="sum").item(), 4)
1.3863
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "balanced_class_weights",
    "counted_class_weights",
    "softmax_cross_entropy",
    "unet_weight_map",
]

# The border term is dropped where it is below this (absolute, in weight units): it lets each
# object's distance transform run on a box around the object instead of the whole image.
_BORDER_TOLERANCE = 1e-6


def softmax_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Pixel-wise softmax cross-entropy ``L(i, j) = -log P_{y(i,j)}(i, j)``, as in the notes.

    Parameters
    ----------
    logits
        ``(N, C, H, W)`` raw class scores ``s_k(i, j)``.
    target
        ``(N, H, W)`` int64 true class per pixel.
    weights
        Optional ``(N, H, W)`` non-negative weight per pixel (e.g. :func:`unet_weight_map`).
    reduction
        ``"mean"`` (default): without weights, the average of ``L`` over all ``N * H * W``
        pixels; with weights, the **weighted mean** ``sum(w * L) / sum(w)``, so that the loss
        keeps the scale of the unweighted one whatever the weights' scale.
        ``"sum"``: ``sum(L)`` or ``sum(w * L)``, the notes' image loss (summed over the batch).

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits must be (N, C, H, W) and target (N, H, W) of the same N, H, W; got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    # torch skips a target of -100 (its ignore_index): out of the unweighted mean, but its
    # weight in the weighted one's denominator, so the two disagreed with every weight 1.
    if target.numel() and not 0 <= int(target.min()) <= int(target.max()) < logits.shape[1]:
        raise ValueError(
            f"target classes must lie in 0..{logits.shape[1] - 1} (the logits' classes); "
            f"got {int(target.min())}..{int(target.max())}"
        )
    if weights is None:
        # F.cross_entropy is exactly -log_softmax gathered at the target, fused and stable.
        return F.cross_entropy(logits, target, reduction=reduction)
    if weights.shape != target.shape:
        raise ValueError(
            f"weights must have the target's shape {tuple(target.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    weights = weights.to(per_pixel.dtype)
    total = (weights * per_pixel).sum()
    if reduction == "sum":
        return total
    return total / weights.sum().clamp_min(torch.finfo(per_pixel.dtype).tiny)


def balanced_class_weights(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """``w_c(k) = n / (K * n_k)`` for the ``K`` classes present (0 for absent ones), ``(C,)``.

    Every present class then carries the same total weight, ``n / K``.

    >>> balanced_class_weights(np.array([0, 0, 0, 1])).tolist()
    [0.6666666666666666, 2.0]
    """
    labels = np.asarray(labels)
    return counted_class_weights(
        np.bincount(labels.ravel().astype(np.int64), minlength=num_classes or 0)
    )


def counted_class_weights(counts: np.ndarray) -> np.ndarray:
    """:func:`balanced_class_weights` of labels whose class ``k`` has ``counts[k]`` pixels
    (a training set's, summed image by image: no array of all its labels).

    >>> counted_class_weights(np.array([3, 1])).tolist()
    [0.6666666666666666, 2.0]
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = counts > 0
    weights = np.zeros(len(counts), dtype=np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def unet_weight_map(
    instances: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Literal["balanced"] | np.ndarray | None = None,
) -> np.ndarray:
    """The U-Net paper's loss weights ``w = w_c + w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))``.

    ``d1``/``d2`` are the Euclidean distances (pixels) from a pixel to the nearest and the
    second-nearest object. The border term is added on pixels outside every object
    (``instances == 0``): the background gaps between objects, which is where the paper's
    figure puts the weight; inside an object it would only blur the object's own interior.
    With fewer than two objects there is no second distance and ``w = w_c``.

    Parameters
    ----------
    instances
        ``(Y, X)`` integer object ids, 0 outside objects (ValueError for ids below 0).
    labels
        ``(Y, X)`` class ids that ``w_c`` balances; default ``instances > 0`` (background,
        object).
    w0, sigma
        Border weight and its decay length in pixels (paper: 10 and about 5).
    class_weights
        ``None``: ``w_c = 1``. ``"balanced"``: :func:`balanced_class_weights` of ``labels``.
        An array: ``w_c = class_weights[labels]``.

    Returns
    -------
    np.ndarray
        ``(Y, X)`` float32.

    Notes
    -----
    One distance transform per object, each on a box around the object grown by the distance
    beyond which the border term is below 1e-6; a pixel outside an object's box is farther
    than that from it. Cost grows with the number of objects times the box area, not the image.
    A ``w0`` of 1e-6 or less keeps the term below 1e-6 everywhere: ``w = w_c``.

    Examples
    --------
    >>> inst = np.zeros((5, 7), dtype=np.int32)
    >>> inst[:, :3], inst[:, 4:] = 1, 2  # two objects, one column of gap
    >>> w = unet_weight_map(inst, w0=10, sigma=5)
    >>> round(float(w[2, 3]), 3)  # d1 = d2 = 1: 1 + 10 * exp(-4 / 50)
    10.231
    >>> float(w[2, 0])  # inside an object: w_c only
    1.0
    """
    instances = np.asarray(instances)
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise ValueError(
            f"instances must be a (Y, X) integer array, got {instances.shape} {instances.dtype}"
        )
    if not (w0 >= 0 and sigma > 0):
        raise ValueError(f"need w0 >= 0 and sigma > 0 pixels, got w0={w0}, sigma={sigma}")
    if instances.size and (low := int(instances.min())) < 0:
        # Densifying the ids keeps the smallest at 0 only when it is background's 0: a
        # negative id would shift background onto an object's id, and its borders with it.
        raise ValueError(
            f"instance ids must be >= 0 (0 outside objects), got {low}; relabel the objects"
        )
    if labels is None:
        labels = (instances > 0).astype(np.uint8)
    labels = np.asarray(labels)
    if labels.shape != instances.shape:
        raise ValueError(f"labels {labels.shape} and instances {instances.shape} differ in shape")
    weights = _class_weight_map(labels, class_weights)
    if w0 <= _BORDER_TOLERANCE:
        # The border term never exceeds w0, so it is below the tolerance everywhere (and
        # reach's logarithm would be negative): dropped, as it is beyond reach for larger w0.
        return weights
    d1, d2 = _two_nearest_distances(
        instances, reach=sigma * math.sqrt(2 * math.log(w0 / _BORDER_TOLERANCE))
    )
    border = np.exp(-((d1 + d2) ** 2) / np.float32(2 * sigma**2), dtype=np.float32)
    border *= np.float32(w0)
    border[instances != 0] = 0
    weights += border
    return weights


def _class_weight_map(
    labels: np.ndarray, class_weights: Literal["balanced"] | np.ndarray | None
) -> np.ndarray:
    if class_weights is None:
        return np.ones(labels.shape, dtype=np.float32)
    if labels.size and (low := int(labels.min())) < 0:
        # numpy indexes a table from its end by a negative id: -1 (an "ignore" label) would
        # get the last class's weight, without a word.
        raise ValueError(f"class ids must be >= 0 to be weighted, got {low}")
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(
                f"class_weights must be None, 'balanced' or an array, got {class_weights!r}"
            )
        table = balanced_class_weights(labels)
    else:
        table = np.asarray(class_weights, dtype=np.float64)
        if table.ndim != 1 or (labels.size and int(labels.max()) >= len(table)):
            raise ValueError(
                f"class_weights needs one weight per class id up to {int(labels.max())}, "
                f"got shape {table.shape}"
            )
    return table.astype(np.float32)[labels.astype(np.intp)]


def _two_nearest_distances(instances: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest object, ``inf`` beyond ``reach`` pixels."""
    shape = instances.shape
    d1 = np.full(shape, np.inf, dtype=np.float32)
    d2 = np.full(shape, np.inf, dtype=np.float32)
    if instances.size == 0:
        return d1, d2
    # Ids made dense (0 stays background): find_objects keeps a slot per id up to the
    # largest, and a tile cut from a slide's instance map keeps its global ids (three
    # objects of ids near 1.5e9 ran out of memory).
    present, dense = np.unique(instances, return_inverse=True)
    instances = dense.reshape(shape) + int(present[0] != 0)
    grow = math.ceil(reach) + 1
    for index, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        region = tuple(
            slice(max(s.start - grow, 0), min(s.stop + grow, n))
            for s, n in zip(box, shape, strict=True)
        )
        # The object lies wholly inside its region, so these are its true distances there.
        dist = ndimage.distance_transform_edt(instances[region] != index).astype(np.float32)
        near, second = d1[region], d2[region]
        np.minimum(second, np.maximum(near, dist), out=second)
        np.minimum(near, dist, out=near)
    return d1, d2
