"""The loss against hand computations, the U-Net weight map against brute force."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from segpipe.training.losses import (
    balanced_class_weights,
    counted_class_weights,
    softmax_cross_entropy,
    unet_weight_map,
)


def _numpy_loss(
    logits: np.ndarray, target: np.ndarray, weights: np.ndarray | None, reduction: str
) -> float:
    # log-softmax by hand: s - log(sum(exp(s))), stabilised by the max.
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n, _, h, w = logits.shape
    picked = log_p[np.arange(n)[:, None, None], target, np.arange(h)[:, None], np.arange(w)]
    per_pixel = -picked
    w_ = np.ones_like(per_pixel) if weights is None else weights
    total = float((w_ * per_pixel).sum())
    return total if reduction == "sum" else total / float(w_.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_equals_a_hand_computation(reduction: str, weighted: bool) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)) * 3
    target = rng.integers(0, 3, size=(2, 4, 5))
    weights = rng.uniform(0.1, 5, size=(2, 4, 5)) if weighted else None
    got = softmax_cross_entropy(
        torch.from_numpy(logits),
        torch.from_numpy(target),
        None if weights is None else torch.from_numpy(weights),
        reduction=reduction,
    )
    assert got.item() == pytest.approx(_numpy_loss(logits, target, weights, reduction), rel=1e-10)


def test_unit_weights_give_the_unweighted_loss() -> None:
    logits = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    target = torch.randint(0, 4, (1, 3, 3))
    ones = torch.ones(1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        softmax_cross_entropy(logits, target, ones), softmax_cross_entropy(logits, target)
    )


def test_loss_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="target"):
        softmax_cross_entropy(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        softmax_cross_entropy(
            torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), reduction="none"
        )


@pytest.mark.parametrize("bad", [-100, -1, 4], ids=["torch's ignore_index", "negative", "C"])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_target_class_outside_the_logits_classes_is_refused(bad: int, weighted: bool) -> None:
    """torch skips a target of -100: left out of the unweighted mean, but its weight stayed
    in the weighted mean's denominator, so with every weight 1 the two losses differed."""
    logits = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    target = torch.randint(0, 4, (1, 3, 3))
    target[0, 1, 1] = bad
    weights = torch.ones(1, 3, 3, dtype=torch.float64) if weighted else None
    with pytest.raises(ValueError, match=rf"target classes must lie in 0\.\.3 .*{bad}"):
        softmax_cross_entropy(logits, target, weights)


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 3), (1, 3, 1)], ids=["a row", "2-d", "a column"])
def test_loss_refuses_weights_of_another_shape_than_the_target(shape: tuple[int, ...]) -> None:
    """Weights that merely broadcast against the target gave a plausible but wrong weighted
    loss and gradient, silently, instead of naming the mistake."""
    logits = torch.zeros(1, 2, 3, 3)
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=rf"weights must have the target's shape \(1, 3, 3\), got {re.escape(str(shape))}",
    ):
        softmax_cross_entropy(logits, target, torch.ones(shape))


def test_a_batch_whose_weights_are_all_zero_has_loss_zero_not_nan() -> None:
    """A batch of only an ignored class (weighted 0) must leave the model as it is: a NaN
    loss stops training as diverged and poisons every weight's gradient."""
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    loss = softmax_cross_entropy(logits, target, torch.zeros(2, 4, 5, dtype=torch.float64))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    np.testing.assert_array_equal(logits.grad.numpy(), 0.0)


def _brute_force_weights(
    instances: np.ndarray, w0: float, sigma: float, wc: np.ndarray
) -> np.ndarray:
    """Every pixel's distance to every object pixel, by enumeration."""
    ys, xs = np.indices(instances.shape)
    out = wc.astype(np.float64).copy()
    ids = [i for i in np.unique(instances) if i != 0]
    for y in range(instances.shape[0]):
        for x in range(instances.shape[1]):
            if instances[y, x] != 0 or len(ids) < 2:
                continue
            d = sorted(
                np.sqrt((ys[instances == i] - y) ** 2 + (xs[instances == i] - x) ** 2).min()
                for i in ids
            )
            out[y, x] += w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return out


def _two_touching_objects() -> np.ndarray:
    inst = np.zeros((24, 40), dtype=np.int32)
    inst[8:16, 4:15] = 1  # two boxes one column apart (x = 15), a third far away
    inst[6:18, 16:24] = 2
    inst[2:5, 36:39] = 3
    return inst


@pytest.mark.parametrize("class_weights", [None, "balanced"])
def test_weight_map_matches_brute_force(class_weights: str | None) -> None:
    inst = _two_touching_objects()
    w = unet_weight_map(inst, w0=10.0, sigma=5.0, class_weights=class_weights)
    fg = inst > 0
    if class_weights is None:
        wc = np.ones(inst.shape)
    else:
        wc = np.where(fg, fg.size / (2 * fg.sum()), fg.size / (2 * (~fg).sum()))
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, _brute_force_weights(inst, 10.0, 5.0, wc), rtol=1e-5, atol=1e-5)


def test_weight_map_of_sparse_huge_ids_is_that_of_dense_ones() -> None:
    """A tile of a slide's instance map keeps its global ids: find_objects kept a slot per id
    up to the largest, and three objects of ids near 1.5e9 ran out of memory."""
    import tracemalloc

    inst = _two_touching_objects()
    huge = np.select([inst == 1, inst == 2, inst == 3], [1_500_000_007, 7, 2_000_000_001], 0)
    tracemalloc.start()
    try:
        w = unet_weight_map(huge.astype(np.int64), w0=10.0, sigma=5.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(w, unet_weight_map(inst, w0=10.0, sigma=5.0))
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB for a 24 x 40 map"


@pytest.mark.parametrize("low", [-1, -(2**40)])
def test_negative_instance_ids_are_refused(low: int) -> None:
    """Densifying the ids shifted background 0 onto a non-zero id: the border weights then
    fell on the wrong pixels, without a word."""
    inst = _two_touching_objects().astype(np.int64)
    inst[inst == 1] = low
    with pytest.raises(ValueError, match=rf"instance ids must be >= 0.*got {low}"):
        unet_weight_map(inst, w0=10.0, sigma=5.0)


@pytest.mark.parametrize("class_weights", [np.array([1.0, 5.0, 9.0]), "balanced"])
def test_negative_class_ids_are_refused_when_weighted(class_weights) -> None:
    """A table lookup counted -1 (an "ignore" label) from the end: class 2's weight."""
    inst = _two_touching_objects()
    labels = (inst > 0).astype(np.int64)
    labels[0, 0] = -1
    with pytest.raises(ValueError, match="class ids must be >= 0 to be weighted, got -1"):
        unet_weight_map(inst, labels=labels, w0=10.0, sigma=5.0, class_weights=class_weights)


def test_weight_map_peaks_in_the_gap_and_is_w_c_far_away() -> None:
    inst = np.zeros((40, 80), dtype=np.int32)
    inst[10:20, 5:20] = 1
    inst[10:20, 21:35] = 2  # touching 1 but for the column x = 20
    w = unet_weight_map(inst, w0=10.0, sigma=5.0, class_weights="balanced")
    wc = balanced_class_weights(inst > 0)
    peak = np.unravel_index(np.argmax(w), w.shape)
    assert peak[1] == 20 and 10 <= peak[0] < 20  # in the gap
    assert w[peak] == pytest.approx(wc[0] + 10 * np.exp(-4 / 50), rel=1e-5)
    # Far from the objects (here, more than ~70 px from both) only w_c remains.
    assert w[39, 79] == pytest.approx(wc[0], abs=1e-5)
    assert w[15, 10] == pytest.approx(wc[1])  # inside an object: w_c


def test_one_object_gets_class_weights_only() -> None:
    inst = np.zeros((16, 16), dtype=np.int32)
    inst[4:8, 4:8] = 7
    np.testing.assert_array_equal(unet_weight_map(inst), np.ones((16, 16), np.float32))


def test_explicit_class_weights_and_labels() -> None:
    inst = _two_touching_objects()
    labels = np.where(inst > 0, 2, 1).astype(np.uint8)
    w = unet_weight_map(inst, labels=labels, w0=0.0, class_weights=np.array([0.0, 0.5, 3.0]))
    np.testing.assert_array_equal(w, np.where(inst > 0, 3.0, 0.5).astype(np.float32))
    with pytest.raises(ValueError, match="one weight per class"):
        unet_weight_map(inst, labels=labels, class_weights=np.array([1.0, 1.0]))


@pytest.mark.parametrize(
    ("w0", "sigma", "shown"),
    [
        (10.0, 0.0, "w0=10.0, sigma=0.0"),
        (10.0, -1.0, "w0=10.0, sigma=-1.0"),
        (-1.0, 5.0, "w0=-1.0, sigma=5.0"),
    ],
)
def test_weight_map_refuses_a_negative_w0_or_a_sigma_not_above_zero(
    w0: float, sigma: float, shown: str
) -> None:
    """sigma 0 divided by zero: the border term vanished without a word (w = w_c), with
    numpy's warnings only."""
    with pytest.raises(ValueError, match=rf"need w0 >= 0 and sigma > 0 pixels, got {shown}$"):
        unet_weight_map(_two_touching_objects(), w0=w0, sigma=sigma)


@pytest.mark.parametrize("w0", [1e-9, 5e-7, 1e-6])
def test_a_border_weight_below_the_tolerance_is_accepted(w0: float) -> None:
    # The border term is dropped where it is below 1e-6; with so small a w0 it is everywhere.
    inst = _two_touching_objects()
    w = unet_weight_map(inst, w0=w0, sigma=5.0)
    np.testing.assert_allclose(
        w, _brute_force_weights(inst, w0, 5.0, np.ones(inst.shape)), rtol=0, atol=1e-6
    )


def test_class_weights_from_counts_are_those_of_the_labels() -> None:
    """A training set's class weights come from its per-image counts: an int64 array of all
    its labels (8 bytes a training pixel) was built only to be counted again."""
    from segpipe.training.losses import counted_class_weights

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 3, size) for size in (50, 70, 1)]  # class 3 absent
    counts = sum(np.bincount(p, minlength=4) for p in parts)
    np.testing.assert_array_equal(
        counted_class_weights(counts), balanced_class_weights(np.concatenate(parts), 4)
    )
    assert counted_class_weights(counts)[3] == 0


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([3, 1, 0], [2 / 3, 2.0, 0.0]),  # n = 4, K = 2 present: 4 / (2 * 3), 4 / (2 * 1)
        ([300, 100, 0], [2 / 3, 2.0, 0.0]),
        ([0, 5, 5, 10], [0.0, 4 / 3, 4 / 3, 2 / 3]),  # n = 20, K = 3: 20/15, 20/15, 20/30
    ],
)
def test_class_weights_divide_by_the_classes_present(counts, expected) -> None:
    """Dividing by all classes, absent ones too, shrank every weight by K / C."""
    np.testing.assert_allclose(counted_class_weights(np.array(counts)), expected, rtol=1e-12)
    labels = np.repeat(np.arange(len(counts)), counts)
    np.testing.assert_allclose(balanced_class_weights(labels, len(counts)), expected, rtol=1e-12)


@pytest.mark.parametrize("gap", [21, 25])
def test_weight_map_keeps_the_border_term_down_to_the_tolerance(gap: int) -> None:
    """Objects' boxes grown by sigma * sqrt(log(w0 / 1e-6)), not sqrt(2 log), dropped terms
    up to 1e-4 between objects 20-28 px apart, above the documented 1e-6."""
    inst = np.zeros((12, 60), dtype=np.int32)
    inst[4:8, 2:6] = 1
    inst[4:8, 6 + gap : 10 + gap] = 2  # gap background columns between the two
    w = unet_weight_map(inst, w0=10.0, sigma=5.0)
    brute = _brute_force_weights(inst, 10.0, 5.0, np.ones(inst.shape))
    np.testing.assert_allclose(w, brute, rtol=0, atol=1e-6)
