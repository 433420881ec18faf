"""The segment_slide flow on Prefect's temporary local server."""

import numpy as np
import pytest
import zarr

import segpipe
from segpipe.analysis.metrics import confusion_matrix, dice
from segpipe.config import SegmentConfig

pytestmark = pytest.mark.integration


def test_segment_slide_ingests_segments_and_summarises(
    prefect_harness, small_slide, random_checkpoint, tmp_path
):
    from segpipe.flows.segment_slide import default_image_store, segment_slide

    out = tmp_path / "slide.seg.zarr"
    summary = segment_slide(
        str(small_slide.image),
        str(out),
        str(random_checkpoint),
        SegmentConfig(tile=64, scheduler="sync"),
        ground_truth=str(small_slide.truth),
    )
    store = default_image_store(out)
    assert store.name == "slide.seg.image.zarr"
    assert segpipe.open_image(store).shape == (300, 300, 3), "the flow ingested the TIFF"

    ds = segpipe.open_result(out)
    assert ds.attrs["segpipe"]["source"] == str(store)
    mask = ds["mask"].values
    truth = zarr.open_array(small_slide.truth, mode="r")[...]
    expected = dice(confusion_matrix(mask, truth, 3))
    np.testing.assert_allclose(summary["dice"], expected)
    np.testing.assert_allclose(
        summary["class_area_um2"], np.bincount(mask.ravel(), minlength=3) * 0.5**2
    )
    assert summary["tiles_total"] == summary["tiles_computed"] + summary["tiles_background"] == 25

    # Run again, the settings as a deployment gives them (JSON, validated by Prefect): the
    # ingest and the result are reused, nothing is recomputed.
    again = segment_slide(
        str(small_slide.image),
        str(out),
        str(random_checkpoint),
        config={"tile": 64, "scheduler": "sync"},
    )
    assert again["seconds"] == summary["seconds"]


def test_segment_slide_segments_the_level_of_the_source_asked_for(
    prefect_harness, random_checkpoint, tmp_path
):
    """The source's pyramid steps 4x, the ingested copy's 2x: level 1 is the source's 4x
    level, as segment gives it, not the copy's 2x one."""
    from test_ingest import _pyramid_tiff

    from segpipe.flows.segment_slide import segment_slide

    source = _pyramid_tiff(tmp_path / "s.tif", 1024, 4, 2)
    config = SegmentConfig(tile=64, scheduler="sync", level=1, foreground="none")
    summary = segment_slide(
        str(source), str(tmp_path / "flow.zarr"), str(random_checkpoint), config
    )
    direct = segpipe.segment(source, tmp_path / "direct.zarr", random_checkpoint, config)
    assert summary["shape"] == segpipe.open_result(direct)["mask"].shape == (256, 256)


@pytest.mark.parametrize("output", ["s3://bucket/out/a.seg.zarr", "memory://out/a.seg.zarr"])
def test_the_default_image_store_of_a_url_output_is_a_url_beside_it(output):
    from segpipe.flows.segment_slide import default_image_store
    from segpipe.io.files import URLPath

    store = default_image_store(output)
    assert isinstance(store, URLPath)
    assert str(store) == output.replace("a.seg.zarr", "a.seg.image.zarr")


@pytest.mark.parametrize("module", ["archive", "segment_slide", "train_model"])
def test_every_task_runs_each_time_it_is_called(module):
    """Prefect's default cache key hashed a model's weights at every call, and served a
    retried run (results persisted) the ingest of an image replaced since: no task has one."""
    import importlib

    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    tasks = vars(importlib.import_module(f"segpipe.flows.{module}")).values()
    policies = {t.name: t.cache_policy for t in tasks if isinstance(t, Task)}
    assert len(policies) >= 3
    assert policies == dict.fromkeys(policies, NO_CACHE)


def test_an_ingest_called_again_in_a_run_that_persists_results_sees_the_new_image(
    prefect_harness, tmp_path
):
    """With PREFECT_RESULTS_PERSIST_BY_DEFAULT a retried run got the cached ingest of the
    image replaced meanwhile back, and segmented the old pixels."""
    import tifffile
    from prefect import flow
    from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

    from segpipe.flows.segment_slide import ingest_task

    source, store = tmp_path / "scan.tif", tmp_path / "scan.image.zarr"
    first, second = (np.full((64, 64, 3), v, np.uint8) for v in (10, 200))

    @flow
    def ingest_twice() -> None:
        tifffile.imwrite(source, first)
        ingest_task(str(source), str(store), None, False)
        tifffile.imwrite(source, second)  # the scan is replaced between the attempts
        ingest_task(str(source), str(store), None, False)

    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        ingest_twice()
    np.testing.assert_array_equal(segpipe.open_image(store).read(0, 64, 0, 64), second)


def test_a_scheduler_no_one_answers_is_refused_before_the_ingest(
    prefect_harness, small_slide, random_checkpoint, tmp_path, monkeypatch
):
    """It was found after the whole slide was ingested, in Dask's bare 30 s timeout."""
    import socket

    from segpipe.execution import schedulers
    from segpipe.flows.segment_slide import default_image_store, segment_slide

    monkeypatch.setattr(schedulers, "CONNECT_TIMEOUT", "1s")  # refused at once, retried till then

    with socket.socket() as s:  # a port no one listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "slide.seg.zarr"
    config = SegmentConfig(tile=64, scheduler=f"tcp://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="cannot reach the Dask scheduler at tcp://127"):
        segment_slide(str(small_slide.image), str(out), str(random_checkpoint), config)
    assert not default_image_store(out).exists()


@pytest.mark.parametrize(
    "keywords",
    [
        {"overwrite": True},
        {"model_name": "tissue-unet v2"},
        {"storage_options": {"anon": True}},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_the_segment_task_hands_its_keywords_to_segment(keywords, monkeypatch):
    """The task is one call into the library: what it is given reaches segpipe.segment
    (an overwrite asked for was dropped, and the result refused as another's)."""
    from segpipe.flows.segment_slide import segment_task

    seen = []
    monkeypatch.setattr(segpipe, "segment", lambda *args, **kw: seen.append((args, kw)) or "r")
    config = SegmentConfig(tile=64)
    assert segment_task.fn("in.ome.zarr", "out.seg.zarr", "m.pt", config, **keywords) == "r"
    ((args, kw),) = seen
    assert args == ("in.ome.zarr", "out.seg.zarr", "m.pt", config)
    assert {k: kw[k] for k in keywords} == keywords
