"""Confusion matrix, Dice and IoU against hand counts and independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.analysis.metrics import confusion_matrix, dice, iou, mean_dice

TRUTH = np.array(
    [
        [0, 0, 0, 1],
        [0, 1, 1, 1],
        [2, 2, 1, 1],
    ]
)
PRED = np.array(
    [
        [0, 0, 1, 1],
        [0, 1, 1, 2],
        [2, 0, 1, 1],
    ]
)


def test_confusion_by_hand() -> None:
    # truth 0: 4 px, one predicted 1; truth 1: 6 px, one predicted 2; truth 2: 2 px, one -> 0.
    expected = np.array(
        [
            [3, 1, 0],
            [0, 5, 1],
            [1, 0, 1],
        ]
    )
    cm = confusion_matrix(PRED, TRUTH, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == TRUTH.size


def test_dice_and_iou_by_hand() -> None:
    cm = confusion_matrix(PRED, TRUTH, 3)
    # class 0: TP 3, FP 1 (a 2 predicted 0), FN 1 -> Dice 6/8, IoU 3/5
    # class 1: TP 5, FP 1, FN 1 -> Dice 10/12, IoU 5/7
    # class 2: TP 1, FP 1, FN 1 -> Dice 2/4, IoU 1/3
    np.testing.assert_allclose(dice(cm), [6 / 8, 10 / 12, 2 / 4])
    np.testing.assert_allclose(iou(cm), [3 / 5, 5 / 7, 1 / 3])
    assert mean_dice(cm) == pytest.approx((6 / 8 + 10 / 12 + 2 / 4) / 3)
    assert mean_dice(cm, classes=(1, 2)) == pytest.approx((10 / 12 + 2 / 4) / 2)


def test_perfect_and_disjoint() -> None:
    t = np.array([0, 1, 1, 2])
    np.testing.assert_array_equal(dice(confusion_matrix(t, t, 3)), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(iou(confusion_matrix(t, t, 3)), [1.0, 1.0, 1.0])
    wrong = np.array([1, 2, 2, 0])
    np.testing.assert_array_equal(dice(confusion_matrix(wrong, t, 3)), [0.0, 0.0, 0.0])


def test_absent_class_is_nan_and_skipped_by_mean() -> None:
    t = np.array([[0, 1], [1, 1]])
    p = np.array([[0, 1], [0, 1]])
    cm = confusion_matrix(p, t, 4)
    d, j = dice(cm), iou(cm)
    assert np.isnan(d[2]) and np.isnan(d[3])
    assert np.isnan(j[2]) and np.isnan(j[3])
    assert mean_dice(cm) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert np.isnan(mean_dice(cm, classes=(2, 3)))
    # Predicted but never true (or the reverse) is a real 0, not NaN.
    assert dice(confusion_matrix(np.array([2]), np.array([0]), 3))[2] == 0.0


def _confusion_by_loop(pred: np.ndarray, truth: np.ndarray, c: int) -> np.ndarray:
    cm = np.zeros((c, c), dtype=np.int64)
    for t, p in zip(truth.ravel(), pred.ravel(), strict=True):
        cm[t, p] += 1
    return cm


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_matches_a_plain_loop(dtype: type) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (13, 17)).astype(dtype)
    pred = rng.integers(0, 4, (13, 17)).astype(dtype)
    np.testing.assert_array_equal(
        confusion_matrix(pred, truth, 4), _confusion_by_loop(pred, truth, 4)
    )


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    cut=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 2**16),
)
def test_chunk_confusions_add_up_to_the_whole(
    shape: tuple[int, int], cut: tuple[float, float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, shape)
    pred = rng.integers(0, 3, shape)
    cy, cx = int(cut[0] * shape[0]), int(cut[1] * shape[1])
    quarters = [
        (slice(0, cy), slice(0, cx)),
        (slice(0, cy), slice(cx, None)),
        (slice(cy, None), slice(0, cx)),
        (slice(cy, None), slice(cx, None)),
    ]
    total = sum(confusion_matrix(pred[q], truth[q], 3) for q in quarters)
    np.testing.assert_array_equal(total, confusion_matrix(pred, truth, 3))
    np.testing.assert_allclose(dice(total), dice(confusion_matrix(pred, truth, 3)))


def test_iou_is_dice_over_two_minus_dice() -> None:
    rng = np.random.default_rng(1)
    cm = confusion_matrix(rng.integers(0, 5, 500), rng.integers(0, 5, 500), 5)
    d = dice(cm)
    np.testing.assert_allclose(iou(cm), d / (2 - d))


def test_empty_input_gives_zero_matrix() -> None:
    cm = confusion_matrix(np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.uint8), 2)
    np.testing.assert_array_equal(cm, np.zeros((2, 2)))
    assert np.isnan(dice(cm)).all()


@pytest.mark.parametrize(
    ("pred", "truth", "c", "error", "match"),
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), 2, ValueError, "same shape"),
        (np.array([0, 3]), np.array([0, 1]), 3, ValueError, "outside"),
        (np.array([0, 1]), np.array([-1, 1]), 3, ValueError, "outside"),
        (np.array([0.0, 1.0]), np.array([0, 1]), 2, TypeError, "integer"),
        (np.array([0, 1]), np.array([0, 1]), 0, ValueError, "num_classes"),
    ],
)
def test_bad_input_is_refused(
    pred: np.ndarray, truth: np.ndarray, c: int, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        confusion_matrix(pred, truth, c)


def test_boolean_masks_are_scored_as_classes_0_and_1() -> None:
    """A boolean mask is the natural form of a binary segmentation (a threshold, a foreground
    mask): False is class 0, True class 1, not a dtype to refuse."""
    pred = np.array([[True, False], [True, True]])
    truth = np.array([[True, False], [False, True]])
    cm = confusion_matrix(pred, truth, 2)
    np.testing.assert_array_equal(cm, [[1, 1], [0, 2]])
    np.testing.assert_array_equal(cm, confusion_matrix(pred.astype(int), truth.astype(int), 2))


def test_non_square_confusion_is_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        dice(np.zeros((2, 3)))
