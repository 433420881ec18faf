"""``segment_slide``: ingest if needed -> segment -> summarise, as a Prefect flow.

Each task is one library call, so the CLI, a notebook or a test runs the same code without
Prefect. With no ``PREFECT_API_URL`` the flow runs on Prefect's temporary local server.
"""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from the
# annotations, and a deployment run loads this file by path, where string annotations may not
# resolve (see segpipe/flows/archive.py).

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import segpipe
from segpipe.analysis.summary import summarise
from segpipe.config import SegmentConfig
from segpipe.execution.cluster import reachable_scheduler
from segpipe.flows.limits import guard_when_temporary
from segpipe.flows.progress import ProgressArtifacts
from segpipe.io.files import URLPath, location
from segpipe.io.imagestore import ingested_level
from segpipe.io.ingest import ingested_image
from segpipe.progress import also_reporting, showing

# A flow called from Python (no CLI) starts its temporary server guarded too.
guard_when_temporary()

__all__ = ["default_image_store", "segment_slide", "segment_task"]


def default_image_store(output: str | Path) -> Path | URLPath:
    """Where the ingested OME-Zarr image goes: beside the result, ``<name>.image.zarr`` (at
    the same URL when ``output`` is one)."""
    out = location(output)
    return out.with_name(out.name.removesuffix(".zarr") + ".image.zarr")


# Every task of segpipe's flows runs each time it is called (NO_CACHE): each judges for itself
# what it may reuse (the ingest its copy by the source's stat and pixels, the segmentation its
# result by its stamp). Prefect's default key (inputs, code, flow run) served a retried run the
# ingest of the image replaced since, where results are persisted
# (PREFECT_RESULTS_PERSIST_BY_DEFAULT); models also went unhashed for a cache.
@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(source: str, store: str, pixel_size_um: float | None, progress: bool) -> str:
    """:func:`segpipe.io.ingest.ingested_image`, its stage a progress artifact."""
    get_run_logger().info("ingesting %s into %s (if needed)", source, store)
    with showing(progress), also_reporting(ProgressArtifacts(store)):
        return str(ingested_image(source, store, pixel_size_um=pixel_size_um))


@task(name="segment", cache_policy=NO_CACHE)
def segment_task(
    image: str,
    output: str,
    model: str | torch.nn.Module,
    config: SegmentConfig,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    slot: Callable[[], AbstractContextManager[Any]] | None = None,
) -> str:
    """:func:`segpipe.segment`, its stages (segment, pyramid) progress artifacts of
    ``output`` and a log line every tenth; ``progress`` also shows them on stderr.
    ``on_progress`` goes to :func:`segpipe.segment` (the archive's claim check: raising
    there stops the run). ``slot()`` is held around each attempt, not across the waits of
    Prefect's retries (a global concurrency slot: a GPU another image may use meanwhile)."""
    held = slot() if slot is not None else nullcontext()
    with held, showing(progress), also_reporting(ProgressArtifacts(output)):
        # Looked up on the package at call time, so a test can stand in for it.
        result = segpipe.segment(
            image,
            output,
            model,
            config,
            model_name=model_name,
            overwrite=overwrite,
            storage_options=storage_options,
            on_progress=on_progress,
        )
    return str(result)


@task(name="summarise", cache_policy=NO_CACHE)
def summarise_task(result: str, ground_truth: str | None) -> dict[str, Any]:
    summary = summarise(result, ground_truth).as_dict()
    get_run_logger().info("summary of %s: %s", result, summary)
    return summary


@flow(name="segment-slide", log_prints=True)
def segment_slide(
    source: str,
    output: str,
    model: str = "tissue-unet",
    config: SegmentConfig | None = None,
    *,
    image_store: str | None = None,
    ground_truth: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Segment one slide into ``output`` and return its summary (areas, Dice if truth given).

    ``config`` holds every setting of the segmentation (default ``SegmentConfig()``); as a
    deployment parameter it is a JSON object, ``{"tile": 256}``, which Prefect validates into
    a ``SegmentConfig``, the settings it leaves out at their defaults (a run's replaces the
    deployment's whole). Its ``pixel_size_um`` also goes to the ingest; its ``level`` is the
    source's, segmented as the copy's level of the same pixel size
    (:func:`segpipe.io.imagestore.ingested_level`). ``image_store`` is where the OME-Zarr copy
    goes (default :func:`default_image_store`).
    """
    config = config or SegmentConfig()
    reachable_scheduler(config.scheduler)  # one no one answers: refused before the ingest
    store = image_store or str(default_image_store(output))
    image = ingest_task(source, store, config.pixel_size_um, progress)
    # ``level`` is the source's: the copy's pyramid steps 2x, a scanner's often 4x.
    config = config.replace(level=ingested_level(source, image, config.level))
    result = segment_task(image, output, model, config, overwrite=overwrite, progress=progress)
    return summarise_task(result, ground_truth)
