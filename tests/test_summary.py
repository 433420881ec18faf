import numpy as np
import pytest
import zarr

import segpipe
from segpipe.analysis.metrics import confusion_matrix, dice
from segpipe.analysis.summary import summarise


def test_summary_areas_and_dice_against_numpy(small_slide, random_checkpoint, tmp_path):
    out = segpipe.segment(
        small_slide.image, tmp_path / "r.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    s = summarise(out, small_slide.truth)
    mask = segpipe.open_result(out)["mask"].values
    truth = zarr.open_array(small_slide.truth, mode="r")[...]
    counts = np.bincount(mask.ravel(), minlength=3)
    assert s.class_pixels == tuple(counts.tolist())
    np.testing.assert_allclose(s.class_area_um2, counts * 0.25)
    np.testing.assert_allclose(s.class_fraction, counts / counts.sum())
    np.testing.assert_allclose(s.dice, dice(confusion_matrix(mask, truth, 3)), equal_nan=True)
    assert s.shape == (300, 300)


def test_summary_refuses_multichannel_truth(small_slide, random_checkpoint, tmp_path):
    out = segpipe.segment(
        small_slide.image, tmp_path / "r.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    with pytest.raises(ValueError, match="one-channel label image"):
        summarise(out, small_slide.image)


def _ids_past_the_classes():
    truth = np.zeros((300, 300), np.uint8)
    truth[100:] = 3  # chunks of ids in [0, 3] and [3, 3]
    truth[-1, -1] = 9
    return truth


@pytest.mark.parametrize(
    ("truth", "message"),
    [
        (
            np.full((300, 300), 7, np.uint8),
            r"class ids in \[7, 7\], outside the result's 3 classes \[0, 3\); map those pixels",
        ),
        # The file's range, not the first chunk's that fails ([0, 3] there)
        (_ids_past_the_classes(), r"class ids in \[0, 9\], outside the result's 3 classes"),
        (np.zeros((300, 299), np.uint8), "ground truth of 300 x 299 px, but the result .* is 300"),
        (np.zeros((300, 300), np.float32), "must hold integer class ids, got float32"),
    ],
    ids=["class-ids", "class-ids-of-the-file", "shape", "float"],
)
def test_a_bad_ground_truth_is_refused_naming_its_file(
    small_slide, random_checkpoint, tmp_path, truth, message
):
    import re

    import tifffile

    out = segpipe.segment(
        small_slide.image, tmp_path / "r.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    path = tmp_path / "truth.tif"
    tifffile.imwrite(path, truth)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}.*{message}"):
        summarise(out, path)


def test_a_result_whose_mask_holds_ids_past_its_classes_is_named_not_the_truth(
    small_slide, random_checkpoint, tmp_path
):
    """The mask's own ids out of range (a damaged result) were reported as the truth's."""
    import tifffile
    import zarr

    out = segpipe.segment(
        small_slide.image, tmp_path / "r.zarr", random_checkpoint, tile=64, scheduler="sync"
    )
    mask = zarr.open_array(out / "0" / "mask", mode="r+")
    mask[0, 0] = 9
    path = tmp_path / "truth.tif"
    tifffile.imwrite(path, np.zeros((300, 300), np.uint8))
    with pytest.raises(ValueError, match=r"r\.zarr: its mask holds class ids in \[0, 9\]"):
        summarise(out, path)


def test_a_result_mask_holding_the_id_one_past_its_classes_is_named_not_the_truth(tmp_path):
    """Class id n in the mask of a result of n classes is out of range as 9 is: the result is
    damaged, and the valid ground truth beside it must not be blamed."""
    import tifffile
    from test_query import make_result

    labels = np.zeros((16, 24), np.uint8)
    labels[4:8, 4:12] = 1
    out, _ = make_result(tmp_path / "r.zarr", labels, tile=8)  # 3 classes: ids 0..2
    zarr.open_array(out / "0" / "mask", mode="r+")[0, 0] = 3
    path = tmp_path / "truth.tif"
    tifffile.imwrite(path, labels)
    with pytest.raises(ValueError, match=r"r\.zarr: its mask holds class ids in \[0, 3\]"):
        summarise(out, path)


def test_summary_iou_is_the_iou_not_the_dice(tmp_path):
    """summarise reports both scores; the IoU (dice / (2 - dice)) is lower than the Dice
    wherever a class is neither perfect nor missed."""
    import tifffile
    from test_query import make_result

    from segpipe.analysis.metrics import iou

    labels = np.zeros((16, 24), np.uint8)
    labels[4:12, 4:16], labels[2:6, 18:22] = 1, 2
    out, _ = make_result(tmp_path / "r.zarr", labels, tile=8)
    truth = labels.copy()
    truth[8:14, 8:20] = 1  # more tissue, over background
    truth[2:4, 18:22] = 0  # half the nucleus
    path = tmp_path / "truth.tif"
    tifffile.imwrite(path, truth)
    s = summarise(out, path)
    conf = confusion_matrix(labels, truth, 3)
    np.testing.assert_allclose(s.iou, iou(conf))
    np.testing.assert_allclose(s.dice, dice(conf))
    assert all(j < d for j, d in zip(s.iou, s.dice, strict=True))


def test_a_summary_of_an_undefined_score_is_json_with_null(tmp_path):
    """A class in neither the mask nor the truth has no Dice (NaN): as_dict, "JSON-ready",
    gave NaN, which json.dumps writes as no JSON (the segment_slide flow returns it)."""
    import json

    import tifffile
    from test_query import make_result

    labels = np.zeros((16, 24), np.uint8)
    labels[4:12, 4:16] = 1  # no class 2 (nucleus), nor in the truth
    out, _ = make_result(tmp_path / "r.zarr", labels, tile=8)
    tifffile.imwrite(tmp_path / "truth.tif", labels)
    s = summarise(out, tmp_path / "truth.tif")
    assert s.dice[:2] == (1.0, 1.0) and np.isnan(s.dice[2])
    parsed = json.loads(json.dumps(s.as_dict(), allow_nan=False))
    assert parsed["dice"] == [1.0, 1.0, None] and parsed["iou"] == [1.0, 1.0, None]


def test_foreground_fraction_is_of_all_pixels_of_a_non_square_image(random_checkpoint, tmp_path):
    """foreground_fraction is the foreground's share of the image's height x width pixels;
    the test slides elsewhere are square, where height x height would do as well."""
    import tifffile

    from segpipe.io.readers import ArrayReader

    ny, nx = 32, 96
    fg = np.zeros((ny, nx), np.uint8)
    fg[:, : nx // 4] = 1  # a quarter of the image
    tifffile.imwrite(tmp_path / "fg.tif", fg)
    image = ArrayReader(np.full((ny, nx, 3), 230, np.uint8), pixel_size_um=0.5)
    out = segpipe.segment(
        image,
        tmp_path / "r.zarr",
        random_checkpoint,
        tile=32,
        level=0,
        scheduler="sync",
        foreground=str(tmp_path / "fg.tif"),
    )
    s = summarise(out)
    assert s.foreground_pixels == ny * nx // 4
    assert s.foreground_fraction == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("georeference", "expected"),
    [
        ({"pixel_size_um": 0.5}, ((1.0, 2.0), "micrometer**2")),
        ({"pixel_size_um": None}, None),
        (
            {"crs": "EPSG:32633", "transform": (2.0, 0, 500000.0, 0, -2.0, 6e6)},
            ((16.0, 32.0), "metre**2"),
        ),
        # a CRS this PROJ cannot read: info and summarise still answer, without areas
        ({"crs": "LOCAL_CS[nonsense", "transform": (2.0, 0, 0, 0, -2.0, 0)}, None),
    ],
)
def test_coordinate_areas_are_in_the_results_units(georeference, expected):
    from segpipe.config import SegmentConfig
    from segpipe.results import ResultMeta, coordinate_areas

    fields = {"pixel_size_um": None, **georeference}
    meta = ResultMeta(source="s.tif", shape=(10, 10), class_names=("a", "b"), model_name="m",
                      model_sha256="0" * 64, halo=0, config=SegmentConfig(), **fields)  # fmt: skip
    assert coordinate_areas([4, 8], meta) == expected


@pytest.mark.parametrize("counts", [[0, 0, 0], np.zeros(2, np.int64), [0]])
def test_class_fractions_of_no_counted_pixel_are_zero(counts):
    """A result killed before its first block counts no pixel: its fractions are 0, not
    NaN (what `segpipe info` and the reports show)."""
    from segpipe.results.summary import RunSummary, class_fractions

    assert class_fractions(counts) == (0.0,) * len(counts)
    summary = RunSummary(
        tiles_total=1, tiles_computed=0, tiles_skipped=0, windows=0, seconds=0.0,
        megapixels_per_second=0.0, class_pixels=tuple(int(n) for n in counts),
    )  # fmt: skip
    assert summary.class_fraction == (0.0,) * len(counts)


@pytest.mark.parametrize("counts", [[5, 6], [5, 6, 1, 2]], ids=["fewer", "more"])
def test_a_summary_counting_other_classes_than_the_result_names_is_refused(counts):
    """Only more counts than names were refused: counts of fewer classes (an attribute edited
    or cut short) passed, and the last named classes had no fraction or area, where the
    result should be reported as damaged."""
    from segpipe.results.summary import RunSummary

    attrs = dict(
        class_pixels=counts, identity={"class_names": ["bg", "fg", "x"]}, tiles_total=1,
        tiles_computed=1, tiles_skipped=0, seconds=1.0, megapixels_per_second=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"class_pixels counts {len(counts)} classes, not 3"):
        RunSummary.from_attrs(attrs)
    assert RunSummary.from_attrs(dict(attrs, class_pixels=[5, 6, 1])).class_pixels == (5, 6, 1)
