"""The answer of an evaluation: per-class pixel scores and the one-to-one object score.

:class:`Evaluation` holds the confusion matrix and what follows from it (IoU, Dice), and
optionally an :class:`ObjectScore`: predicted objects matched to ground-truth instances at
IoU >= 0.5 by :func:`match_objects`. How the labels are obtained is
:mod:`segpipe.analysis.evaluation`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from segpipe.analysis import metrics

__all__ = ["Evaluation", "ObjectScore", "match_objects"]


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
        return {**asdict(self), **{k: _or_none(v) for k, v in scores.items()}}


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
            "iou": {k: _or_none(v) for k, v in self.iou.items()},
            "dice": {k: _or_none(v) for k, v in self.dice.items()},
            "mean_iou": _or_none(self.mean_iou),
            "mean_dice": _or_none(self.mean_dice),
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


def _or_none(score: float) -> float | None:
    """``score``, or None for NaN (an undefined score, JSON's null).

    >>> _or_none(0.5), _or_none(float("nan"))
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
