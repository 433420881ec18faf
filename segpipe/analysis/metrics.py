"""Segmentation quality from a confusion matrix: Dice and IoU per class.

Everything starts from the confusion matrix because it **adds up**: the matrix of a whole mask
is the sum of the matrices of any partition of it into chunks. A gigapixel result is scored
chunk by chunk (a Dask ``map_blocks`` or a loop over tiles) with ``confusion_matrix`` on each
chunk and one ``sum`` at the end; Dice and IoU are then computed once, from the total. (Averaging
per-chunk Dice scores instead would weight a chunk with ten pixels of a class like one with a
million, and is not the whole-image Dice.)

>>> truth = np.array([[0, 0, 1], [1, 2, 2]])
>>> pred = np.array([[0, 1, 1], [1, 2, 0]])
>>> cm = confusion_matrix(pred, truth, 3)
>>> cm
array([[1, 1, 0],
       [0, 2, 0],
       [1, 0, 1]])
>>> dice(cm).round(3)
array([0.5  , 0.8  , 0.667])
>>> bool((confusion_matrix(pred[:1], truth[:1], 3) + confusion_matrix(pred[1:], truth[1:], 3)
...       == cm).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class LabelError(ValueError):
    """Labels that do not fit the classes: class ids outside them, an object class that is
    none of them (a fault of the labels given, not of reading them). ``labels`` says whose
    ids they are where known: ``"pred"`` or ``"truth"`` (:func:`confusion_matrix`'s);
    ``problem`` is what is wrong with them, without advice (the message where not given)."""

    def __init__(self, message: str, *, labels: str | None = None, problem: str = "") -> None:
        super().__init__(message)
        self.labels = labels
        self.problem = problem or message


__all__ = ["LabelError", "confusion_matrix", "dice", "iou", "mean_dice"]


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts of each (true class, predicted class) pair.

    Parameters
    ----------
    pred, truth
        Integer class maps of the same shape (any number of dimensions), values in
        ``[0, num_classes)``.
    num_classes
        ``C``, the number of classes, background included.

    Returns
    -------
    np.ndarray
        ``(C, C)`` int64; ``cm[t, p]`` counts pixels of true class ``t`` predicted as ``p``
        (rows truth, columns prediction). Matrices of disjoint chunks add up to the matrix of
        their union.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(
            f"pred and truth must have the same shape, got {pred.shape} and {truth.shape}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, a in (("pred", pred), ("truth", truth)):
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
            raise TypeError(f"{name} must hold integer class ids, got dtype {a.dtype}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= num_classes):
            problem = (
                f"holds class ids in [{int(a.min())}, {int(a.max())}], outside [0, {num_classes})"
            )
            raise LabelError(
                f"{name} {problem}; pass the right num_classes or map ignored pixels first",
                labels=name,
                problem=problem,
            )
    # One bincount over a combined index: (truth, pred) -> truth * C + pred.
    index = truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    counts = np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {cm.shape}")
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp  # predicted as the class, truly another
    fn = cm.sum(axis=1) - tp  # truly the class, predicted as another
    return tp, fp, fn


def dice(confusion: np.ndarray) -> np.ndarray:
    """Dice coefficient (F1) per class, ``2 TP / (2 TP + FP + FN)``, ``(C,)`` float64.

    NaN for a class absent from both truth and prediction (0/0: nothing to score), so that
    ``np.nanmean`` skips it rather than counting it as perfect or as a failure.

    >>> dice(np.array([[5, 0], [0, 0]]))
    array([ 1., nan])
    """
    tp, fp, fn = _per_class(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * tp / (2 * tp + fp + fn)


def iou(confusion: np.ndarray) -> np.ndarray:
    """Intersection over union (Jaccard) per class, ``TP / (TP + FP + FN)``, ``(C,)`` float64.

    NaN for a class absent from both truth and prediction. ``iou = dice / (2 - dice)``.

    >>> iou(np.array([[3, 1], [1, 1]])).round(3)
    array([0.6  , 0.333])
    """
    tp, fp, fn = _per_class(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fp + fn)


def mean_dice(confusion: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """Mean Dice over ``classes`` (all by default), ignoring classes that are NaN.

    Pass ``classes=(1, 2)`` to leave the background out, which otherwise flatters a mostly
    empty slide. NaN if every selected class is NaN.

    >>> mean_dice(np.array([[8, 0, 0], [0, 3, 1], [0, 1, 3]]), classes=(1, 2))
    0.75
    """
    scores = dice(confusion)
    if classes is not None:
        scores = scores[list(classes)]
    if np.all(np.isnan(scores)):
        return float("nan")
    return float(np.nanmean(scores))
