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
