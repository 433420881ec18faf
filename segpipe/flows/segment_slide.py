"""``segment_slide``: ingest if needed -> segment -> summarise, as a Prefect flow.

Each task is one library call, so the CLI, a notebook or a test runs the same code without
Prefect. With no ``PREFECT_API_URL`` the flow runs on Prefect's temporary local server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

import segpipe
from segpipe.analysis.summary import summarise
from segpipe.io.ingest import ingested_image


def default_image_store(output: str | Path) -> Path:
    """Where the ingested OME-Zarr image goes: beside the result, ``<name>.image.zarr``."""
    out = Path(output)
    return out.with_name(out.name.removesuffix(".zarr") + ".image.zarr")


@task(name="ingest")
def ingest_task(source: str, store: str, pixel_size_um: float | None, progress: bool) -> str:
    get_run_logger().info("ingesting %s into %s (if needed)", source, store)
    return str(ingested_image(source, store, pixel_size_um=pixel_size_um, progress=progress))


@task(name="segment")
def segment_task(image: str, output: str, model: str, options: dict[str, Any]) -> str:
    logger = get_run_logger()
    reported = [-1]

    def log_progress(done: int, total: int) -> None:
        decile = 10 * done // max(total, 1)
        if decile > reported[0]:
            reported[0] = decile
            logger.info("segmented %d/%d tiles", done, total)

    return str(segpipe.segment(image, output, model, on_progress=log_progress, **options))


@task(name="summarise")
def summarise_task(result: str, ground_truth: str | None) -> dict[str, Any]:
    summary = summarise(result, ground_truth).as_dict()
    get_run_logger().info("summary of %s: %s", result, summary)
    return summary


@flow(name="segment-slide", log_prints=True)
def segment_slide(
    source: str,
    output: str,
    model: str = "tissue-unet",
    *,
    image_store: str | None = None,
    ground_truth: str | None = None,
    pixel_size_um: float | None = None,
    tile: int = 512,
    mode: str = "exact",
    device: str = "auto",
    scheduler: str | None = None,
    n_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Segment one slide into ``output`` and return its summary (areas, Dice if truth given)."""
    store = image_store or str(default_image_store(output))
    image = ingest_task(source, store, pixel_size_um, progress)
    options = {
        "tile": tile,
        "mode": mode,
        "device": device,
        "scheduler": scheduler,
        "n_workers": n_workers,
        "overwrite": overwrite,
        "progress": progress,
    }
    result = segment_task(image, output, model, options)
    return summarise_task(result, ground_truth)
