"""The answer of an evaluation: per-class pixel scores and the one-to-one object score.

:class:`Evaluation` holds the confusion matrix and what follows from it (IoU, Dice), and
optionally an :class:`ObjectScore`: the predicted objects of one class (:func:`object_class_of`)
matched to ground-truth instances at IoU >= 0.5 by :func:`object_score`. How the labels are
obtained is :mod:`segpipe.analysis.evaluation`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any

import numpy as np
from scipy import ndimage

from segpipe.analysis import metrics
from segpipe.analysis.metrics import LabelError

__all__ = [
    "Evaluation",
    "InstancesError",
    "ObjectClassError",
    "ObjectScore",
    "check_instance_dtype",
    "check_instance_ids",
    "check_scoring",
    "match_objects",
    "object_class_id",
    "object_class_of",
    "object_score",
    "score_or_none",
]


class InstancesError(LabelError):
    """Ground-truth instances that cannot be scored: negative ids, or no object to infer the
    object class from (a fault of the instances given, not of the class labels)."""


class ObjectClassError(LabelError):
    """An object class that is none of the classes (a fault of the option, not the labels)."""


@dataclass(frozen=True)
class ObjectScore:
    """Object-level detection of one class at an IoU threshold.

    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``f1 = 2 TP / (2 TP + FP + FN)``;
    NaN where the denominator is 0.
    """

    class_name: str
    iou_threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def f1(self) -> float:
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        return _ratio(2 * tp, 2 * tp + fp + fn)

    def as_dict(self) -> dict[str, Any]:
        """Plain data, strict JSON: an undefined (NaN) score is None."""
        scores = {"precision": self.precision, "recall": self.recall, "f1": self.f1}
        return {**asdict(self), **{k: score_or_none(v) for k, v in scores.items()}}


@dataclass(frozen=True)
class Evaluation:
    """Scores of a prediction against ground truth.

    ``iou``/``dice`` per class (NaN for a class absent from both); ``mean_iou``/``mean_dice``
    over the classes other than the first (background), NaN ignored; ``confusion[t, p]``
    counts pixels of true class ``t`` predicted as ``p``.
    """

    class_names: tuple[str, ...]
    confusion: np.ndarray
    objects: ObjectScore | None = None

    @property
    def iou(self) -> dict[str, float]:
        return dict(zip(self.class_names, metrics.iou(self.confusion).tolist(), strict=True))

    @property
    def dice(self) -> dict[str, float]:
        return dict(zip(self.class_names, metrics.dice(self.confusion).tolist(), strict=True))

    @property
    def mean_iou(self) -> float:
        scores = metrics.iou(self.confusion)[1:]
        return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")

    @property
    def mean_dice(self) -> float:
        return metrics.mean_dice(self.confusion, classes=range(1, len(self.class_names)))

    def as_dict(self) -> dict[str, Any]:
        """Plain data (strict JSON- and checkpoint-ready): a score that is NaN here (a class
        absent from truth and prediction) is None, JSON's null, since ``json.dumps`` would
        write NaN as a bare ``NaN`` that strict JSON readers refuse."""
        return {
            "class_names": list(self.class_names),
            "iou": {k: score_or_none(v) for k, v in self.iou.items()},
            "dice": {k: score_or_none(v) for k, v in self.dice.items()},
            "mean_iou": score_or_none(self.mean_iou),
            "mean_dice": score_or_none(self.mean_dice),
            "confusion": self.confusion.tolist(),
            "objects": None if self.objects is None else self.objects.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """The evaluation :meth:`as_dict` wrote, from its ``class_names``, ``confusion`` and
        ``objects`` (the scores are recomputed from them). Other keys are ignored: a training
        result or a checkpoint's metrics hold an evaluation's keys among their own."""
        try:
            names = tuple(str(n) for n in data["class_names"])
            confusion = np.asarray(data["confusion"], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(
                f"not an evaluation's data: no {exc.args[0]!r} (keys {sorted(data)})"
            ) from None
        if confusion.shape != (len(names), len(names)):
            raise ValueError(
                f"confusion of shape {confusion.shape} does not fit {len(names)} classes {names}"
            )
        found = data.get("objects")
        objects = None
        if found is not None:
            objects = ObjectScore(
                str(found["class_name"]),
                float(found["iou_threshold"]),
                int(found["true_positives"]),
                int(found["false_positives"]),
                int(found["false_negatives"]),
            )
        return cls(names, confusion, objects)

    def report(self) -> str:
        """A small text table."""
        lines = [f"{'class':<14}{'IoU':>8}{'Dice':>8}"]
        lines += [f"{n:<14}{self.iou[n]:>8.4f}{self.dice[n]:>8.4f}" for n in self.class_names]
        lines.append(f"{'mean (no bg)':<14}{self.mean_iou:>8.4f}{self.mean_dice:>8.4f}")
        if self.objects is not None:
            o = self.objects
            lines.append(
                f"objects '{o.class_name}' at IoU >= {o.iou_threshold}: TP {o.true_positives}  "
                f"FP {o.false_positives}  FN {o.false_negatives}  precision {o.precision:.4f}  "
                f"recall {o.recall:.4f}  F1 {o.f1:.4f}"
            )
        return "\n".join(lines)


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def score_or_none(score: float) -> float | None:
    """``score``, or None for NaN (an undefined score, JSON's null).

    >>> score_or_none(0.5), score_or_none(float("nan"))
    (0.5, None)
    """
    return None if np.isnan(score) else float(score)


def match_objects(
    predicted: np.ndarray, truth: np.ndarray, *, iou_threshold: float = 0.5
) -> tuple[int, int, int]:
    """Match predicted objects to true ones one-to-one; return ``(TP, FP, FN)``.

    ``predicted`` and ``truth`` are ``(Y, X)`` integer object maps (0 outside objects). Pairs
    are taken greedily by decreasing IoU among those with IoU >= ``iou_threshold``, each object
    used at most once. For a threshold above 0.5 the matching is unique anyway: an object
    cannot overlap two disjoint objects each by more than half their union.
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ in shape")
    pred_ids, pred = np.unique(predicted, return_inverse=True)
    true_ids, true = np.unique(truth, return_inverse=True)
    pred, true = pred.reshape(-1), true.reshape(-1)
    n_pred = int(np.count_nonzero(pred_ids))
    n_true = int(np.count_nonzero(true_ids))
    pred_area = np.bincount(pred, minlength=len(pred_ids))
    true_area = np.bincount(true, minlength=len(true_ids))
    both = (pred_ids[pred] != 0) & (true_ids[true] != 0)
    pairs, inter = np.unique(
        pred[both].astype(np.int64) * len(true_ids) + true[both], return_counts=True
    )
    p, t = np.divmod(pairs, len(true_ids))
    iou = inter / (pred_area[p] + true_area[t] - inter)
    keep = iou >= iou_threshold
    used_p, used_t, tp = set(), set(), 0
    for k in np.argsort(-iou[keep], kind="stable"):
        a, b = int(p[keep][k]), int(t[keep][k])
        if a not in used_p and b not in used_t:
            used_p.add(a)
            used_t.add(b)
            tp += 1
    return tp, n_pred - tp, n_true - tp


def check_instance_dtype(dtype: np.dtype) -> None:
    """Refuse instances of ``dtype`` unless it holds ids: integers (or bool, one object)."""
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)):
        raise InstancesError(f"instances must hold integer object ids, got {dtype}")


def check_instance_ids(lowest: int, highest: int, *, need_object: bool) -> None:
    """Refuse instances whose ids span ``[lowest, highest]`` if any is negative, or if none is
    an object (all 0) when ``need_object`` (the object class is to be inferred from them).

    Negative ids (-1, "ignore" in some tools) are refused as training refuses them: taken as
    objects, all pixels of one such id, however far apart, were one true object.
    """
    if lowest < 0:
        raise InstancesError(
            f"instances must be object ids >= 0 (0 outside objects), found {lowest}; give "
            "each object its own id > 0 and 0 where there is none"
        )
    if need_object and highest <= 0:
        raise InstancesError(
            "instances holds no object (all ids 0), so the object class cannot be inferred: "
            "pass object_class (--object-class), or the instances of this image"
        )


def check_scoring(iou_threshold: float, min_size_px: int, connectivity: int = 1) -> None:
    """Refuses an IoU threshold outside (0, 1], a negative least object size (pixels), or a
    connectivity other than 1 or 2 (scipy takes 0 for "no neighbours": a pixel an object)."""
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8), got {connectivity}")
    if not 0 < iou_threshold <= 1:
        raise ValueError(
            f"iou_threshold (--iou-threshold) must be in (0, 1], got {iou_threshold}: the "
            "least IoU of a match (0.5 is usual)"
        )
    if min_size_px < 0:
        raise ValueError(
            f"min_size_px (--min-size) must be 0 or more pixels, got {min_size_px} (0 keeps "
            "every predicted object)"
        )


def check_object_class(object_class: int | str | None, has_instances: bool) -> None:
    """Refuses an object class without the true objects (instances) its score is over."""
    if object_class is not None and not has_instances:
        raise ValueError(
            f"object_class (--object-class) {object_class!r} picks the class of the object "
            "score, which needs the true objects: give instances (--instances) too"
        )


def object_class_of(
    instances: np.ndarray,
    truth: np.ndarray,
    object_class: int | str | None,
    names: tuple[str, ...],
) -> int:
    """The class id whose objects are scored: ``object_class`` (a name, an id, or an id's
    digits as the CLI gives it), or when None the ``truth`` class under most ``instances``
    pixels (both ``(Y, X)``). Refuses instances that are no integer ids first."""
    check_instance_dtype(instances.dtype)
    lowest, highest = int(instances.min(initial=0)), int(instances.max(initial=0))
    check_instance_ids(lowest, highest, need_object=object_class is None)
    if object_class is None:
        return int(np.bincount(truth[instances > 0].astype(np.int64)).argmax())
    return object_class_id(object_class, names)


def object_class_id(object_class: int | str, names: tuple[str, ...]) -> int:
    """The id of ``object_class`` among the classes ``names``: a name, an id, or an id's
    digits as the CLI gives it; :class:`ObjectClassError` for none of them."""
    cls = names.index(object_class) if object_class in names else object_class
    if not isinstance(cls, Integral | str) or isinstance(cls, bool):  # 1.7 became class 1
        raise ObjectClassError(
            f"object_class (--object-class) {cls!r} is neither a class name nor an integer id "
            f"of {names}"
        )
    if isinstance(cls, str) and not cls.isdecimal():  # "2" (--object-class 2) is an id
        raise ObjectClassError(
            f"object_class (--object-class) {cls!r} is not one of the classes {names}"
        )
    if not 0 <= (cls := int(cls)) < len(names):
        raise ObjectClassError(f"object_class (--object-class) {cls} is not a class id of {names}")
    return cls


def object_score(
    predicted: np.ndarray,
    instances: np.ndarray,
    truth: np.ndarray,
    cls: int,
    class_name: str,
    *,
    iou_threshold: float = 0.5,
    connectivity: int = 1,
    min_size_px: int = 0,
) -> ObjectScore:
    """Connected components of the ``(Y, X)`` boolean ``predicted`` (pixels of class ``cls``),
    those under ``min_size_px`` pixels dropped, matched to the ``instances`` of class ``cls``
    in ``truth``; ``connectivity`` 1 joins across edges, 2 also across corners."""
    structure = ndimage.generate_binary_structure(2, connectivity)
    components, _ = ndimage.label(predicted, structure=structure)
    if min_size_px > 0:
        small = np.bincount(components.ravel()) < min_size_px
        small[0] = False
        components[small[components]] = 0
    # Instances of other classes are no objects to find: matched against, they would count
    # as misses however good the prediction.
    ours = _instances_of(instances, truth, cls)
    tp, fp, fn = match_objects(components, ours, iou_threshold=iou_threshold)
    return ObjectScore(class_name, iou_threshold, tp, fp, fn)


def _instances_of(instances: np.ndarray, truth: np.ndarray, cls: int) -> np.ndarray:
    """``instances`` with every instance whose most frequent ``truth`` class is not ``cls``
    set to 0 (ties go to the lower class id).

    >>> inst = np.array([[1, 1, 2, 2, 2]]); truth = np.array([[1, 1, 2, 2, 1]])
    >>> _instances_of(inst, truth, 2).tolist()
    [[0, 0, 2, 2, 2]]
    """
    ids, index = np.unique(instances, return_inverse=True)
    index = index.reshape(-1)
    labels = truth.reshape(-1).astype(np.int64)
    n = int(labels.max(initial=0)) + 1
    counts = np.bincount(index * n + labels, minlength=len(ids) * n).reshape(len(ids), n)
    kept = counts.argmax(axis=1) == cls
    return np.where(kept[index].reshape(instances.shape), instances, 0)
