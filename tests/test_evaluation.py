"""Pixel and object scores on hand-made examples; evaluate() on a result and on a model;
evaluate_model, the one in-memory evaluator (training's validation)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe import models
from segpipe.analysis.evaluation import (
    Evaluation,
    evaluate,
    evaluate_labels,
    evaluate_model,
    match_objects,
)
from segpipe.analysis.metrics import LabelError

NAMES = ("background", "cell")


def scene() -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: A and B touching (sharing an edge), C alone. Returns (labels, instances)."""
    inst = np.zeros((20, 30), dtype=np.int32)
    inst[2:8, 2:8] = 1  # A, 36 px
    inst[2:8, 8:14] = 2  # B, 36 px, touching A
    inst[12:17, 20:25] = 3  # C, 25 px
    return (inst > 0).astype(np.uint8), inst


def test_touching_objects_predicted_as_one_blob_match_nothing() -> None:
    truth, inst = scene()
    pred = truth.copy()  # A and B as one blob (IoU 0.5 with neither... exactly 36/72)
    pred[2:8, 8] = 1
    pred[0, 27:30] = 1  # a spurious object
    pred[12, 20:25] = 0  # C slightly smaller: IoU 20/25
    e = evaluate_labels(pred, truth, class_names=NAMES, instances=inst, iou_threshold=0.51)
    o = e.objects
    assert (o.true_positives, o.false_positives, o.false_negatives) == (1, 2, 2)
    assert o.precision == pytest.approx(1 / 3)
    assert o.recall == pytest.approx(1 / 3)
    assert o.f1 == pytest.approx(2 / (2 + 2 + 2))
    assert o.class_name == "cell"


def test_a_blob_matches_at_most_one_of_two_touching_objects() -> None:
    truth, inst = scene()
    inst[2:8, 11:14], inst[2:8, 8:11] = 2, 1  # A now 54 px, B 18 px; the union is the blob
    pred = truth.copy()
    e = evaluate_labels(pred, truth, class_names=NAMES, instances=inst)
    o = e.objects
    # The blob (72 px) overlaps A with IoU 54/72 = 0.75: one match; B is missed; C matched.
    assert (o.true_positives, o.false_positives, o.false_negatives) == (2, 0, 1)
    # Separated correctly: three matches.
    split = pred.copy()
    split[2:8, 10] = 0
    inst2 = inst.copy()
    inst2[2:8, 10] = 0
    o = evaluate_labels(
        split, (inst2 > 0).astype(np.uint8), class_names=NAMES, instances=inst2
    ).objects
    assert (o.true_positives, o.false_positives, o.false_negatives) == (3, 0, 0)


def test_objects_are_matched_only_to_instances_of_the_object_class() -> None:
    """Instances of another class (a tissue region beside the nuclei) are neither matched
    nor missed: a perfect prediction of the nuclei scores recall 1."""
    inst = np.zeros((20, 30), dtype=np.int32)
    inst[2:8, 2:8], inst[2:8, 10:14], inst[12:17, 20:25] = 1, 2, 3
    truth = np.where(inst == 3, 2, inst > 0).astype(np.uint8)  # nuclei 1, 2; tissue 3
    names = ("bg", "nucleus", "tissue")
    o = evaluate_labels(truth, truth, class_names=names, instances=inst, object_class="nucleus")
    counts = (o.objects.true_positives, o.objects.false_positives, o.objects.false_negatives)
    assert counts == (2, 0, 0)
    assert o.objects.recall == 1.0
    # An id as the CLI gives it (--object-class 1) was refused as no class name.
    for given in (1, "1"):
        by_id = evaluate_labels(truth, truth, class_names=names, instances=inst, object_class=given)
        assert by_id.objects == o.objects
    with pytest.raises(LabelError, match=r"object_class \(--object-class\) 3 is not a class id"):
        evaluate_labels(truth, truth, class_names=names, instances=inst, object_class="3")
    # A float id is no id (1.7 was class 1), nor a bool; a numpy integer is one.
    for bad in (1.7, 1.0, True):
        with pytest.raises(LabelError, match=rf"{bad} is neither a class name nor an integer id"):
            evaluate_labels(truth, truth, class_names=names, instances=inst, object_class=bad)
    by_id = evaluate_labels(
        truth, truth, class_names=names, instances=inst, object_class=np.int64(1)
    )
    assert by_id.objects == o.objects
    # An instance of mixed truth is one of the class most of its pixels have.
    truth[12, 20:25] = 1  # 5 of the region's 25 pixels nucleus: still tissue
    o = evaluate_labels(truth, truth, class_names=names, instances=inst, object_class="tissue")
    assert (o.objects.true_positives, o.objects.false_negatives) == (1, 0)


def test_pixel_scores_equal_hand_counts() -> None:
    truth, _ = scene()
    pred = np.zeros_like(truth)
    pred[2:8, 2:11] = 1  # A and half of B; C missed
    e = evaluate_labels(pred, truth, class_names=NAMES)
    tp = 54
    fn = int(truth.sum()) - tp
    fp = 0
    assert e.iou["cell"] == pytest.approx(tp / (tp + fp + fn))
    assert e.dice["cell"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert e.mean_iou == pytest.approx(e.iou["cell"])
    assert e.objects is None
    assert e.as_dict()["confusion"] == [[truth.size - 97, 0], [fn, tp]]
    assert "cell" in e.report()


def test_match_objects_is_one_to_one() -> None:
    truth = np.array([[1, 1, 2, 2]])
    pred = np.array([[5, 5, 5, 5]])
    assert match_objects(pred, truth, iou_threshold=0.5) == (1, 0, 1)  # IoU 0.5 with both
    assert match_objects(pred, truth, iou_threshold=0.6) == (0, 1, 2)
    assert match_objects(np.zeros((2, 2), int), np.zeros((2, 2), int)) == (0, 0, 0)


@pytest.mark.parametrize(("a", "b"), [(1, 2), (2, 1), (7, 3)])
def test_match_objects_takes_the_highest_iou_pairs_first(a: int, b: int) -> None:
    """Pairs taken by increasing IoU let a weak pair use up the objects of two strong ones."""
    truth = np.zeros((10, 40), dtype=np.int32)
    truth[:, 0:10] = 1  # X, 100 px
    truth[:, 20:30] = 2  # Y, 100 px
    pred = np.zeros_like(truth)
    pred[:, 0:26] = a  # A, 260 px: IoU(A, X) = 100/260 = 0.385, IoU(A, Y) = 60/300 = 0.2
    pred[:, 26:30] = b  # B, 40 px inside Y: IoU(B, Y) = 40/100 = 0.4
    # By hand, greedy by decreasing IoU: B-Y (0.4), A-X (0.385); A-Y (0.2) finds both used.
    assert match_objects(pred, truth, iou_threshold=0.15) == (2, 0, 0)
    # Above 0.385 only B-Y is left; above 0.4 nothing.
    assert match_objects(pred, truth, iou_threshold=0.39) == (1, 1, 1)
    assert match_objects(pred, truth, iou_threshold=0.41) == (0, 2, 2)


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.mark.integration
def test_evaluate_a_model_and_its_result_store(random_checkpoint: Path, tmp_path: Path) -> None:
    from segpipe import models, open_result
    from segpipe.analysis.metrics import confusion_matrix, iou
    from segpipe.synthetic import tissue_slide

    slide = tissue_slide(64, seed=0)
    image = _write(tmp_path / "image.png", slide.image)
    truth = _write(tmp_path / "truth.png", slide.labels)
    inst = _write(tmp_path / "inst.png", slide.instances.astype(np.uint16))
    out = tmp_path / "result.zarr"
    by_model = evaluate(
        str(random_checkpoint), truth, image=image, instances=inst, output=out, tile=32
    )
    mask = open_result(out)["mask"].values
    expected = iou(confusion_matrix(mask, slide.labels, 3))
    np.testing.assert_allclose(list(by_model.iou.values()), expected)
    by_result = evaluate(out, truth, instances=slide.instances)
    np.testing.assert_array_equal(by_result.confusion, by_model.confusion)
    assert by_result.objects == by_model.objects
    assert by_result.objects.class_name == "nucleus"
    # The in-memory path (training, benchmarks) agrees with the pipeline's.
    in_memory = evaluate_model(models.load(random_checkpoint), slide, tile=32)
    np.testing.assert_array_equal(in_memory.confusion, by_model.confusion)
    with pytest.raises(ValueError, match="image"):
        evaluate(str(random_checkpoint), truth)
    # Another run's settings at the output: refused, not replaced (as segment refuses it).
    from segpipe.results import ResultMismatchError, read_attrs

    started = read_attrs(out)["started"]
    with pytest.raises(
        ResultMismatchError, match=r"result\.zarr holds .* \(differs in: tile: 32 stored, 16"
    ):
        evaluate(str(random_checkpoint), truth, image=image, output=out, tile=16)
    assert read_attrs(out)["started"] == started
    again = evaluate(
        str(random_checkpoint), truth, image=image, output=out, tile=16, overwrite=True
    )
    assert read_attrs(out)["started"] != started
    assert again.confusion.sum() == by_model.confusion.sum()


def test_evaluate_a_result_at_a_url_as_segment_returns_it() -> None:
    """A remote result given as the URLPath segment() returns is scored, not taken for a
    model."""
    import fsspec
    from test_query import make_result

    from segpipe.io.files import location

    truth, inst = scene()
    pred = truth.copy()
    pred[2:8, 8] = 0
    url = location("memory://evaluate-url/r.zarr")
    try:
        make_result(url, pred, tile=16, classes=NAMES)
        got = evaluate(url, truth, instances=inst)
    finally:
        fsspec.filesystem("memory").rm("/evaluate-url", recursive=True)
    want = evaluate_labels(pred, truth, class_names=NAMES, instances=inst)
    np.testing.assert_array_equal(got.confusion, want.confusion)
    assert got.objects == want.objects


def test_specks_below_min_size_are_not_objects() -> None:
    truth, inst = scene()
    pred = truth.copy()
    pred[8:14, 2:14] = 0
    pred[2:8, 7:9] = 0  # A and B predicted apart
    pred[18, 0] = pred[0, 29] = 1  # two one-pixel specks
    counts = evaluate_labels(pred, truth, class_names=NAMES, instances=inst).objects
    assert (counts.true_positives, counts.false_positives) == (3, 2)
    clean = evaluate_labels(pred, truth, class_names=NAMES, instances=inst, min_size_px=2)
    assert (clean.objects.true_positives, clean.objects.false_positives) == (3, 0)


def test_an_object_of_exactly_min_size_px_is_kept() -> None:
    """min_size_px drops components *under* that many pixels: an object of exactly that size
    is a real object to match, not speckle."""
    inst = np.zeros((6, 8), dtype=np.int32)
    inst[1:3, 1:3] = 1  # 4 px
    inst[1:4, 5] = 2  # 3 px
    truth = (inst > 0).astype(np.uint8)
    o = evaluate_labels(truth, truth, class_names=NAMES, instances=inst, min_size_px=4).objects
    assert (o.true_positives, o.false_positives, o.false_negatives) == (1, 0, 1)


def test_connectivity_2_joins_a_predicted_object_across_corners() -> None:
    """With connectivity=2 (8-neighbours) a diagonal line of pixels is one object, the true
    one; with 1 it is three, none overlapping the true object enough to match."""
    inst = np.zeros((5, 5), dtype=np.int32)
    inst[[1, 2, 3], [1, 2, 3]] = 1
    truth = (inst > 0).astype(np.uint8)
    o = evaluate_labels(truth, truth, class_names=NAMES, instances=inst, connectivity=2).objects
    assert (o.true_positives, o.false_positives, o.false_negatives) == (1, 0, 0)
    o = evaluate_labels(truth, truth, class_names=NAMES, instances=inst, connectivity=1).objects
    assert (o.true_positives, o.false_positives, o.false_negatives) == (0, 3, 1)


def test_evaluate_drops_a_results_specks_below_min_size(tmp_path: Path) -> None:
    """evaluate() of a result store takes min_size_px (--min-size) as evaluate_labels does:
    the speckle it is given to drop is not counted as false positives."""
    from test_query import make_result

    truth, inst = scene()
    pred = truth.copy()
    pred[2:8, 7:9] = 0  # A and B predicted apart
    pred[18, 0] = pred[0, 29] = 1  # two one-pixel specks
    path, _ = make_result(tmp_path / "r.seg.zarr", pred, tile=16, classes=NAMES)
    for min_size, false_positives in ((0, 2), (2, 0)):
        got = evaluate(path, truth, instances=inst, min_size_px=min_size).objects
        want = evaluate_labels(pred, truth, class_names=NAMES, instances=inst, min_size_px=min_size)
        assert got == want.objects
        assert (got.true_positives, got.false_positives) == (3, false_positives)


def test_evaluate_model_hands_the_model_back_in_the_mode_it_was_given() -> None:
    """Prediction runs in eval mode, and the caller's mode is restored after: a model given
    in eval mode (about to predict) must not come back training, its dropout and batch-norm
    then changing the caller's next predictions."""
    import torch

    from segpipe.geometry.tiling import Geometry
    from segpipe.synthetic import tissue_slide

    modes = []

    class Constant(torch.nn.Module):
        geometry = Geometry(halo=0, multiple=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            modes.append(self.training)
            return torch.zeros(x.shape[0], 3, *x.shape[2:])

    slide = tissue_slide(32, seed=1)
    for training in (False, True):
        net = Constant().train(training)
        evaluate_model(net, slide, tile=32)
        assert net.training is training
    assert modes and not any(modes)


def test_evaluate_model_scores_a_constant_predictor() -> None:
    import torch

    from segpipe.geometry.tiling import Geometry
    from segpipe.synthetic import tissue_slide

    class Constant(torch.nn.Module):
        geometry = Geometry(halo=0, multiple=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = torch.zeros(x.shape[0], 3, *x.shape[2:])
            scores[:, 1] = 1.0  # always "tissue"
            return scores

    slide = tissue_slide(128, seed=1)
    assert (slide.labels == 2).any()
    result = evaluate_model(Constant(), slide, tile=32)
    truth = slide.class_fractions()
    assert result.dice["background"] == 0.0
    assert result.dice["nucleus"] == 0.0
    assert result.dice["tissue"] == pytest.approx(2 * truth[1] / (1 + truth[1]))
    assert result.mean_dice == pytest.approx(result.dice["tissue"] / 2)
    assert np.sum(result.confusion) == 128 * 128
    # No nucleus predicted: every true nucleus is missed.
    assert result.objects.class_name == "nucleus"
    assert result.objects.true_positives == 0
    assert result.objects.false_negatives == len(np.unique(slide.instances)) - 1


def test_an_object_class_without_instances_is_refused_not_ignored() -> None:
    """object_class picks the class of the object score; with no true objects there is none,
    and the request must not pass as if scored (it was ignored before)."""
    from types import SimpleNamespace

    import torch

    from segpipe.geometry.tiling import Geometry
    from segpipe.synthetic import tissue_slide

    class Constant(torch.nn.Module):
        geometry = Geometry(halo=0, multiple=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 3, *x.shape[2:])  # always "background"

    slide = tissue_slide(64, seed=1)
    bare = SimpleNamespace(
        image=slide.image,
        labels=slide.labels,
        instances=None,
        class_names=slide.class_names,
        shape=slide.shape,
    )
    refused = r"object_class \(--object-class\) 'nucleus' .* needs the true objects"
    with pytest.raises(ValueError, match=refused):
        evaluate_labels(
            slide.labels, slide.labels, class_names=slide.class_names, object_class="nucleus"
        )
    with pytest.raises(ValueError, match=refused):
        evaluate_model(Constant(), bare, tile=32, object_class="nucleus")
    # One image with instances among others without: the object score is over that one.
    mixed = evaluate_model(Constant(), [bare, slide, bare], tile=32, object_class="nucleus")
    assert mixed.objects is not None
    assert mixed.objects.true_positives == 0
    assert mixed.objects.false_negatives == len(np.unique(slide.instances)) - 1
    assert np.sum(mixed.confusion) == 3 * 64 * 64


def test_an_evaluation_round_trips_through_plain_data() -> None:
    truth, inst = scene()
    pred = truth.copy()
    pred[2:8, 8] = 0
    e = evaluate_labels(pred, truth, class_names=NAMES, instances=inst)
    data = json.loads(json.dumps({**e.as_dict(), "epochs": [], "train_seconds": 1.0}))
    back = Evaluation.from_dict(data)  # a training result: other keys are ignored
    np.testing.assert_array_equal(back.confusion, e.confusion)
    assert back.class_names == e.class_names
    assert back.objects == e.objects
    assert back.as_dict() == e.as_dict()
    with pytest.raises(ValueError, match="confusion"):
        Evaluation.from_dict({"class_names": ["a", "b"]})
    with pytest.raises(ValueError, match="2 classes"):
        Evaluation.from_dict({"class_names": ["a", "b"], "confusion": [[1]]})


def test_as_dict_is_strict_json_with_none_for_undefined_scores() -> None:
    """A class absent from truth and prediction, and no predicted object, have no score:
    None (JSON null), never NaN, which json.dumps writes as a bare ``NaN`` no JSON reader
    takes."""
    truth, inst = scene()
    e = evaluate_labels(np.zeros_like(truth), truth, class_names=(*NAMES, "absent"), instances=inst)
    data = json.loads(json.dumps(e.as_dict(), allow_nan=False))
    assert data["iou"]["absent"] is None and data["dice"]["absent"] is None
    assert data["iou"]["cell"] == 0.0
    assert data["objects"]["precision"] is None and data["objects"]["recall"] == 0.0
    assert Evaluation.from_dict(data).as_dict() == data


def test_scoring_a_result_needs_neither_training_nor_torch() -> None:
    """analysis sits below training, and scoring a result store must not pay for torch."""
    code = (
        "import sys, segpipe.analysis.evaluation; "
        "print(sorted(m for m in sys.modules if m == 'torch' or "
        "m.startswith(('segpipe.training', 'segpipe.execution', 'segpipe.flows'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_float_ground_truth_is_refused_naming_it(tmp_path):
    """Ground truth holds integer class ids: a float image is a user's mistake, named as such
    (it reached the metrics as a TypeError naming no file)."""
    import numpy as np
    import tifffile

    from segpipe.io.labelfiles import label_plane

    path = tmp_path / "truth.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match=r"truth\.tif: ground truth must be .* dtype float32"):
        label_plane(path, "ground truth")


def _result_and_truth(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    from test_query import make_result

    truth, inst = scene()
    path, _ = make_result(tmp_path / "r.seg.zarr", truth, tile=16, classes=NAMES)
    return path, truth, inst


def test_a_truth_of_another_size_is_refused_before_the_model_runs(
    random_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked against the level the model would segment, naming both, before it runs: a
    whole slide segmented only to be told the truth was of another image is hours lost."""
    import segpipe.execution.segment as segment_module

    def segment(*args: object, **kw: object) -> None:
        raise AssertionError("segmented before the truth's shape was checked")

    monkeypatch.setattr(segment_module, "segment", segment)
    image = _write(tmp_path / "image.png", np.zeros((20, 30, 3), np.uint8))
    truth = _write(tmp_path / "truth.png", np.zeros((20, 31), np.uint8))
    with pytest.raises(ValueError, match=r"truth\.png: ground truth of 20 x 31 px, but .*image"):
        evaluate(str(random_checkpoint), truth, image=image)
    good = _write(tmp_path / "good.png", np.zeros((20, 30), np.uint8))
    inst = _write(tmp_path / "inst.png", np.zeros((21, 30), np.uint16))
    with pytest.raises(ValueError, match=r"inst\.png: instances of 21 x 30 px"):
        evaluate(str(random_checkpoint), good, image=image, instances=inst)
    # A mistyped --object-class, found only after the whole slide was segmented, was hours
    # lost too: it is checked against the model's classes first, naming them and the image.
    inst = _write(tmp_path / "inst2.png", np.zeros((20, 30), np.uint16))
    names = models.load(random_checkpoint).class_names
    typos = (("nucleu", "'nucleu' is not one of the classes"), (9, "9 is not a class id of"))
    for given, said in typos:
        with pytest.raises(ValueError, match=rf"{said} {re.escape(str(names))} \(those of .*image"):
            evaluate(str(random_checkpoint), good, image=image, instances=inst, object_class=given)


def test_a_bad_truth_of_a_result_is_refused_naming_it_and_the_result(tmp_path: Path) -> None:
    path, truth, _ = _result_and_truth(tmp_path)
    wide = _write(tmp_path / "wide.png", np.zeros((20, 31), np.uint8))
    with pytest.raises(ValueError, match=rf"wide\.png: .* but the result {path} is 20 x 30"):
        evaluate(path, wide)
    ids = _write(tmp_path / "ids.png", truth * 5)  # class 5 of a two-class result
    with pytest.raises(
        ValueError,
        match=rf"^.*ids\.png \(ground truth of the result {path}\): holds class ids in \[0, 5\], "
        r"outside \[0, 2\); map those pixels \(ignored ones, e\.g\. 255\) to one of the result's",
    ):  # no num_classes to pass, as the message once said
        evaluate(path, ids)


@pytest.mark.parametrize("damage", ["cut short", "a byte flipped"])
def test_a_damaged_result_is_not_blamed_on_its_ground_truth(tmp_path: Path, damage: str) -> None:
    """A result's mask chunk cut short: zarr's checksum error was reported as the (intact)
    ground truth's, naming only the truth file. A byte flipped: zstd's RuntimeError came out
    raw, naming neither."""
    from segpipe.analysis.summary import summarise

    path, truth, _ = _result_and_truth(tmp_path)
    good = _write(tmp_path / "truth.png", truth)
    assert evaluate(path, good).mean_dice == 1.0
    chunk = next(f for f in sorted((path / "0" / "mask" / "c").rglob("*")) if f.is_file())
    data = bytearray(chunk.read_bytes())
    if damage == "cut short":
        data = data[: max(1, len(data) // 2)]
    else:
        data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    blamed = rf"the result {path} or its ground truth .*truth\.png cannot be read: "
    with pytest.raises(ValueError, match=blamed):
        evaluate(path, good)
    with pytest.raises(ValueError, match=rf"{path} or its ground truth .*truth\.png cannot be"):
        summarise(path, ground_truth=good)


def test_object_score_options_are_checked(tmp_path: Path) -> None:
    path, truth, inst = _result_and_truth(tmp_path)
    for bad in (7.0, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"iou_threshold \(--iou-threshold\) must be in"):
            evaluate_labels(truth, truth, class_names=NAMES, instances=inst, iou_threshold=bad)
        with pytest.raises(ValueError, match="iou_threshold"):
            evaluate(path, truth, instances=inst, iou_threshold=bad)
    with pytest.raises(ValueError, match=r"min_size_px \(--min-size\) must be 0 or more"):
        evaluate(path, truth, instances=inst, min_size_px=-4)
    # scipy takes 0 as "no neighbours" (a perfect prediction of 4 objects scored as one
    # false positive a pixel) and 3 as 2: both were taken without a word.
    for bad in (0, 3):
        with pytest.raises(
            ValueError, match=r"^connectivity must be 1 \(4-neighbours\) or 2 \(8\), got "
        ):
            evaluate_labels(truth, truth, class_names=NAMES, instances=inst, connectivity=bad)
    assert evaluate(path, truth, instances=inst, iou_threshold=1.0).objects is not None
    # Without instances there is no object score for object_class to pick the class of.
    with pytest.raises(ValueError, match=r"needs the true objects: give instances \(--instances"):
        evaluate(path, truth, object_class="cell")
    # A result is segmented already: an image given with it would be silently ignored.
    image = _write(tmp_path / "image.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="is a result store, already segmented"):
        evaluate(path, truth, image=image)


def test_a_result_whose_mask_holds_ids_past_its_classes_is_named_not_the_truth(
    tmp_path: Path,
) -> None:
    """The damaged result's mask was blamed on the truth file ("truth.png (ground truth of
    the result ...): pred holds class ids in [0, 9]"), as summarise no longer does."""
    import zarr

    path, truth, _ = _result_and_truth(tmp_path)
    zarr.open_array(path / "0" / "mask", mode="r+")[0, 0] = 9
    with pytest.raises(ValueError, match="its mask holds") as refused:
        evaluate(path, _write(tmp_path / "truth.png", truth))
    assert str(refused.value) == (
        f"the result {path}: its mask holds class ids in [0, 9], outside [0, {len(NAMES)}): "
        "damaged, segment it again"
    )
    # The truth's own ids outside the classes are still the truth's
    wrong = _write(tmp_path / "wrong.png", np.full_like(truth, 7))
    zarr.open_array(path / "0" / "mask", mode="r+")[0, 0] = 0
    with pytest.raises(ValueError, match=r"wrong\.png \(ground truth of the result .*: holds"):
        evaluate(path, wrong)


def test_a_mistyped_result_is_not_taken_for_a_model(random_checkpoint: Path, tmp_path: Path):
    truth, _ = scene()
    typo = tmp_path / "typo.seg.zarr"
    with pytest.raises(ValueError, match=f"^no such result or checkpoint: {typo}"):
        evaluate(typo, truth)
    # A model that is there but has no image: the hint names the option of both interfaces.
    with pytest.raises(ValueError, match=r"image= / --image"):
        evaluate(str(random_checkpoint), truth)


def test_negative_instance_ids_are_refused_as_training_refuses_them(tmp_path: Path) -> None:
    """-1 ("ignore" in some tools) was taken as one object: two -1 regions far apart, one
    true object, and a perfect prediction scored TP 2, FP 1."""
    import tifffile

    truth, inst = scene()
    inst[inst == 2] = inst[inst == 3] = -1  # B and C, apart, marked "ignore"
    with pytest.raises(LabelError, match=r"instances must be object ids >= 0 .* found -1"):
        evaluate_labels(truth, truth, class_names=NAMES, instances=inst, object_class=1)
    path, truth, _ = _result_and_truth(tmp_path)
    tifffile.imwrite(tmp_path / "neg.tif", inst)
    with pytest.raises(ValueError, match=r"^\S*neg\.tif: instances must be object ids >= 0"):
        evaluate(path, truth, instances=tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"^the instances array: instances must be object"):
        evaluate(path, truth, instances=inst, object_class="cell")
    # A float array's ids (a NaN failed int() with a message naming nothing, 1.5 was an id).
    for bad in (np.nan, 1.5):
        floats = inst.astype(np.float32)
        floats[0, 0] = bad
        with pytest.raises(ValueError, match=r"^the instances array: .* integer object ids"):
            evaluate(path, truth, instances=floats, object_class="cell")
        with pytest.raises(LabelError, match="integer object ids"):
            evaluate_labels(truth, truth, class_names=NAMES, instances=floats, object_class=1)


def test_instance_and_object_class_faults_are_not_blamed_on_the_result_or_truth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Instances with no object were reported as "the result R or its ground truth T cannot
    be read", an --object-class naming no class as the ground truth's fault."""
    from segpipe.cli import main

    path, truth, inst = _result_and_truth(tmp_path)
    good = _write(tmp_path / "truth.png", truth)
    empty = _write(tmp_path / "empty.png", np.zeros_like(inst, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"^\S*empty\.png: instances holds no object") as err:
        evaluate(path, good, instances=empty)
    assert "cannot be read" not in str(err.value) and "truth.png" not in str(err.value)
    # Given the class, no object is a score (every predicted object a false positive).
    assert evaluate(path, good, instances=empty, object_class="cell").objects.false_positives
    ids = _write(tmp_path / "ids.png", inst.astype(np.uint16))
    for given, said in (("nope", "'nope' is not one of the classes"), ("5", "5 is not a class")):
        with pytest.raises(ValueError, match=rf"^object_class \(--object-class\) {said}") as err:
            evaluate(path, good, instances=ids, object_class=given)
        assert f"(those of the result {path})" in str(err.value)
        assert "truth.png" not in str(err.value)
    assert main(["evaluate", str(path), str(good), "--instances", str(empty)]) == 2
    assert f"error: {empty}: instances holds no object" in capsys.readouterr().err
