"""``process-archive``: segment every new or changed image of an archive, on a schedule.

discover -> for each image (at most ``max_concurrent`` at a time) one task that fingerprints,
claims, segments (a nested task with Prefect retries for transient failures), writes the report
and thumbnail and indexes the result in the catalog -> a table artifact for the run. Each task
calls :mod:`segpipe.archive` (:func:`~segpipe.archive.process_image`: the same without Prefect).

A failing image (a corrupt file, a model that does not fit) fails its own task only: the run
goes on, its table naming the file and the reason; later runs retry it after a growing delay,
at most 6 hours apart (``held`` meanwhile), until it changes or a run passes ``retry_failed``
(:mod:`segpipe.archive.state`). A stopped run (Ctrl-C, SIGTERM, a cancellation) stops its
images at their next progress report ("interrupted": the next run resumes them). On a schedule:
:func:`serve_archive` (``flow.serve``) or ``deploy/prefect.yaml`` (a work pool and a worker).
"""

# No `from __future__ import annotations` here: a served run loads this file by path and
# Prefect builds its parameter model from the annotations, which then must be real objects
# (as strings, `Literal[...]` does not resolve there and every run fails validation).

import contextlib
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.schedules import Cron

from segpipe import archive
from segpipe.archive import ArchiveImage, ImageOutcome, LoadedModel, RunStopped, catalog, reports
from segpipe.config import SegmentConfig
from segpipe.execution.cluster import local_cluster, plan_for_device, reachable_scheduler
from segpipe.flows.limits import RUN_OPTIONS, check_run_options, global_slot, run_stop, stop_of
from segpipe.flows.progress import ProgressArtifacts, artifact_key
from segpipe.flows.retries import is_transient
from segpipe.flows.segment_slide import segment_task
from segpipe.io.files import is_url, location
from segpipe.progress import also_reporting, stage

__all__ = ["ArchiveFailedError", "artifact_key", "process_archive", "serve_archive"]


@task(name="discover-images", cache_policy=NO_CACHE)
def discover_task(
    source: str,
    pattern: str,
    min_age_s: float,
    exclude: str,
    storage_options: dict[str, Any] | None,
) -> list[ArchiveImage]:
    images = archive.discover_images(
        source,
        pattern=pattern,
        min_age_s=min_age_s,
        exclude=exclude,
        storage_options=storage_options,
    )
    get_run_logger().info("found %d images in %s", len(images), source)
    return images


@dataclass(frozen=True)
class RunPolicy:
    """How a run treats each image (the flow's parameters of the same names): retries of a
    transient failure, the claim's owner and timeout, a global concurrency limit, whether
    images held back after failing are tried anyway."""

    retries: int
    retry_delay_s: float
    lock_ttl_s: float
    owner: str
    concurrency_limit: str | None = None
    storage_options: dict[str, Any] | None = None
    retry_failed: bool = False


@task(name="load-model", cache_policy=NO_CACHE)
def load_model_task(model: str) -> LoadedModel:
    """The model, loaded and hashed once for every image of the run."""
    loaded = archive.load_model(model)
    get_run_logger().info("model %s, sha256 %s", loaded.name, loaded.sha256[:16])
    return loaded


# No cache key (segpipe.flows.segment_slide says why).
@task(name="archive-image", task_run_name="image-{image.key}", cache_policy=NO_CACHE)
def image_task(
    image: ArchiveImage,
    output_root: str,
    model: LoadedModel,
    config: SegmentConfig,
    policy: RunPolicy,
    stop_key: str,
) -> ImageOutcome:
    """One image start to finish (:func:`segpipe.archive.process_image`), plus its artifact;
    the run's stop (:func:`~segpipe.flows.limits.stop_of` ``stop_key``) stops it too."""
    logger, stop = get_run_logger(), stop_of(stop_key)
    segment = segment_task.with_options(
        retries=policy.retries,
        retry_delay_seconds=policy.retry_delay_s,
        retry_condition_fn=is_transient,
    )

    def run_segment(
        source: str,
        output: Path,
        module: torch.nn.Module,
        config: SegmentConfig,
        *,
        on_progress: Callable[[int, int], None] | None = None,
        **kw: Any,
    ) -> str:
        # on_progress named: process_image passes it only to a run_segment that names it
        slot = functools.partial(global_slot, policy.concurrency_limit, stop)
        return segment(
            str(source), str(output), module, config, on_progress=on_progress, slot=slot, **kw
        )

    outcome = archive.process_image(
        image,
        output_root,
        model,
        config=config,
        owner=policy.owner,
        ttl_s=policy.lock_ttl_s,
        storage_options=policy.storage_options,
        run_segment=run_segment,
        retry_failed=policy.retry_failed,
        stop=stop,
    )
    logger.info("%s: %s (%s)", image.key, outcome.status, outcome.reason)
    if outcome.status == "segmented":
        report = location(outcome.report or "", policy.storage_options)
        _report_artifact(image.key, output_root, lambda: report.read_text("utf-8"), "report")
    return outcome


def _report_artifact(key: str, root: str, markdown: Callable[[], str], what: str) -> None:
    """The image's report (or failure) as a markdown artifact (:func:`_artifact`)."""
    where = {"key": artifact_key("report", root, key), "description": f"segpipe {what} of {key}"}
    _artifact(f"{what} of {key}", lambda: create_markdown_artifact(markdown(), **where))


def _artifact(what: str, create: Callable[[], object]) -> None:
    """``create()`` an artifact, only a view of what the run recorded: an error there (the
    API, reading a report) is logged and changes no outcome or run."""
    try:
        create()
    except Exception:
        get_run_logger().warning("no %s artifact", what, exc_info=True)


@flow(name="process-archive")
def process_archive(
    source: str,
    output_root: str,
    model: str = "tissue-unet",
    config: SegmentConfig | None = None,
    *,
    pattern: str = "*",
    max_concurrent: int = 1,
    concurrency_limit: str | None = None,
    retries: int = 2,
    retry_delay_s: float = 10.0,
    lock_ttl_s: float = 600.0,
    min_age_s: float = 0.0,
    storage_options: dict[str, Any] | None = None,
    fail_on_error: bool = False,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Segment the images of ``source`` that have no up-to-date result under ``output_root``.

    Parameters
    ----------
    source
        Archive folder or fsspec URL (``s3://bucket/scans``).
    output_root
        Results, reports, thumbnails, locks and the catalog (``_catalog/``).
    model
        Shipped model name or checkpoint path; loaded and hashed once per run.
    config
        Every setting of the segmentation (default ``SegmentConfig()``); as a deployment
        parameter, a JSON object (``{"tile": 256}``) validated into a ``SegmentConfig``, the
        settings it leaves out at their defaults (a run's replaces the deployment's whole).
        A result setting (``tile``, ``mode``, ``window``, ``level``...) changed makes every
        image due again; an execution setting (``batch_size``, ``device``, ``n_workers``,
        ``scheduler``) does not. ``scheduler`` None (and no ``DASK_SCHEDULER_ADDRESS``): one
        local Dask cluster for the run, shared by its images and closed at its end; ``"sync"``:
        in the task's thread; ``"tcp://host:8786"``: a running cluster shared by all images.
    pattern, min_age_s, storage_options
        Which files count (:func:`segpipe.archive.discover_images`).
    max_concurrent
        Images in flight at once in this run; another starts as soon as one finishes.
    concurrency_limit
        A Prefect global concurrency limit every segmentation takes a slot of, shared by all
        runs on the server (``prefect gcl create NAME --limit 1``); a name it lacks is refused.
    retries, retry_delay_s
        Prefect retries of a segmentation that failed with a transient error.
    lock_ttl_s
        Seconds without a heartbeat after which another run may take over an image's claim.
    fail_on_error
        End the run Failed when any image failed in this run (after all the others are done);
        images held back after failing in earlier runs do not count.
    retry_failed
        Try images that failed before with the same inputs now, not after their retry delay.

    Returns
    -------
    dict
        ``summary`` (one sentence), ``segmented``/``skipped``/``busy``/``changed`` (image
        keys; ``changed``: the file changed while it was segmented, due again), ``failed``
        and ``held`` (key -> reason), ``gone`` (keys the catalog holds of images renamed,
        moved or deleted since: their records and results stay).
    """
    logger = get_run_logger()
    # Run-wide mistakes fail the run here, once, before any image is read or recorded.
    check_run_options(
        max_concurrent=max_concurrent,
        retries=retries,
        retry_delay_s=retry_delay_s,
        lock_ttl_s=lock_ttl_s,
        min_age_s=min_age_s,
        concurrency_limit=concurrency_limit,
    )
    config = config or SegmentConfig()
    # a file:// URL its local path (location()), as the CLI and check_run_inputs read it
    root = output_root if is_url(output_root) else str(Path(location(output_root)).absolute())
    archive.check_run_inputs(root, config, storage_options)
    images = discover_task(source, pattern, min_age_s, root, storage_options)
    loaded = load_model_task(model)
    policy = RunPolicy(
        retries=retries,
        retry_delay_s=retry_delay_s,
        lock_ttl_s=lock_ttl_s,
        owner=_owner(),
        concurrency_limit=concurrency_limit,
        storage_options=storage_options,
        retry_failed=retry_failed,
    )

    with contextlib.ExitStack() as run_cluster:
        # A scheduler no one answers fails the run here, once, not each image in turn.
        if images and reachable_scheduler(config.scheduler) is None:
            # One cluster for the run, shared by its images: a cluster per image would size
            # itself to the whole machine, max_concurrent of them at once. The scheduler is an
            # execution setting, so the address leaves every result's identity as it is.
            plan = plan_for_device(config.device, config.n_workers)
            config = config.replace(scheduler=run_cluster.enter_context(local_cluster(plan)))
            logger.info("local Dask cluster for the run at %s", config.scheduler)
        # The run's own progress artifact (and a CLI's bar): images finished of those found.
        with (
            also_reporting(ProgressArtifacts("progress", root, stages=("archive",))),
            stage("archive", total=len(images), unit="image") as finished,
        ):
            # An image that killed an earlier run goes last: it would kill this one too.
            order = archive.killed_last(images, location(root, storage_options))
            submitted = _submit_refilling(
                order, max_concurrent, root, loaded, config, policy, finished.advance
            )
        found = {image.key: n for n, image in enumerate(images)}  # reported as found
        submitted.sort(key=lambda pair: found[pair[0].key])
        outcomes = [_outcome(image, future, root) for image, future in submitted]
    try:  # renamed, moved or deleted since: said, never deleted; a view, failing no run
        gone = catalog.gone_images(root, found, storage_options)
    except Exception:
        logger.warning("no list of the images gone from the archive", exc_info=True)
        gone = []

    _artifact(
        "run table",
        lambda: create_table_artifact(
            reports.run_table(outcomes),
            key=artifact_key("archive", root),
            description=reports.run_markdown(outcomes, gone),
        ),
    )
    summary = reports.describe_run(outcomes, gone)
    logger.info("%s", summary)
    result = {
        "summary": summary,
        **{
            status: {o.image: o.reason for o in outcomes if o.status == status}
            for status in ("failed", "held")
        },
        **{
            status: [o.image for o in outcomes if o.status == status]
            for status in ("segmented", "skipped", "busy", "changed")
        },
        "gone": gone,
    }
    if fail_on_error and result["failed"]:
        raise ArchiveFailedError(result)
    return result


class ArchiveFailedError(RuntimeError):
    """Raised by ``process_archive(fail_on_error=True)`` once every image is done, some of
    them failed; ``summary`` is what the run would have returned."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__(f"{len(summary['failed'])} image(s) failed: {summary['failed']}")
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles a failed run's exception; the default would pass back the message.
        return type(self), (self.summary,)


def _submit_refilling(
    images: list[ArchiveImage],
    max_concurrent: int,
    root: str,
    loaded: LoadedModel,
    config: SegmentConfig,
    policy: RunPolicy,
    on_finished: Callable[[], None] = lambda: None,
) -> list[tuple[ArchiveImage, PrefectFuture[ImageOutcome]]]:
    """Submit an image task for each image, at most ``max_concurrent`` in flight: a new one
    starts as soon as any one finishes (not the oldest: a large slide would hold its slot's
    neighbours back). Calls ``on_finished()`` (in this thread) as each one finishes and
    returns when all have, with every image and its future, in the order of ``images``.

    Stopped (Ctrl-C, SIGTERM, a cancellation: raised in this thread only), it stops the
    images in flight and waits for them before it raises: each records "interrupted" (not
    failed) and the run's cluster is closed after them, not under them."""
    submitted: list[tuple[ArchiveImage, PrefectFuture[ImageOutcome]]] = []
    in_flight: set[PrefectFuture[ImageOutcome]] = set()
    with run_stop() as (stop_key, stop):
        try:
            for image in images:
                if len(in_flight) >= max_concurrent:
                    in_flight.remove(next(as_completed(list(in_flight))))
                    on_finished()
                future = image_task.submit(image, root, loaded, config, policy, stop_key)
                submitted.append((image, future))
                in_flight.add(future)
            for _ in as_completed(list(in_flight)):
                on_finished()
        except BaseException:
            stop.set()
            for future in in_flight:
                with contextlib.suppress(RunStopped):  # raised by the image, as asked
                    future.wait()  # a second Ctrl-C ends the wait
            raise
    return submitted


def _outcome(image: ArchiveImage, future: PrefectFuture[ImageOutcome], root: str) -> ImageOutcome:
    """The image's outcome; a failed task becomes a ``failed`` outcome naming the error."""
    future.wait()
    if future.state.is_completed():
        return future.result()
    error = future.state.result(raise_on_failure=False)
    outcome = (
        ImageOutcome.failure(image.key, error)
        if isinstance(error, BaseException)
        else ImageOutcome(image.key, "failed", future.state.message or "failed")
    )
    get_run_logger().error("%s failed: %s", image.key, outcome.reason)
    text = f"# segpipe: {image.key} failed\n\n`{image.url}`\n\n{outcome.reason}\n"
    _report_artifact(image.key, root, lambda: text, "failure")
    return outcome


def _owner() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.id} on {socket.gethostname()}:{os.getpid()}"


def serve_archive(
    source: str,
    output_root: str,
    model: str = "tissue-unet",
    config: SegmentConfig | dict[str, Any] | None = None,
    *,
    cron: str = "0 2 * * *",
    timezone: str = "UTC",
    name: str = "archive",
    paused: bool = False,
    **parameters: Any,
) -> None:
    """Serve :func:`process_archive` on a cron schedule from this process (``flow.serve``).

    Blocks until interrupted; runs triggered by the schedule, the UI or ``run_deployment``
    (``process-archive/<name>``) execute here, one at a time. Needs a Prefect server
    (``PREFECT_API_URL``). ``config`` (a ``SegmentConfig`` or a mapping of settings) and the
    other keyword arguments (``pattern``, ``max_concurrent``...) become the runs' default
    parameters, refused (ValueError, OSError) as a run's first checks would refuse them.
    """
    if timezone not in available_timezones():  # Prefect checks it only once the root is made
        raise ValueError(
            f"timezone {timezone!r} is no IANA time zone name (e.g. Europe/Paris, UTC)"
        )
    schedule = Cron(cron, timezone=timezone)  # a bad cron string: before the root is made
    if config is not None:  # stored as JSON in the deployment
        config = config if isinstance(config, SegmentConfig) else SegmentConfig.from_dict(config)
        parameters["config"] = config.as_dict()
    parameters = {"source": source, "output_root": output_root, "model": model, **parameters}
    # Checked now: a scheduled run would find a mistake only at its hour, perhaps in the night.
    run = process_archive.validate_parameters(parameters)
    check_run_options(**{name: run[name] for name in RUN_OPTIONS})
    archive.check_run_inputs(output_root, config, run["storage_options"])
    process_archive.serve(
        name=name,
        schedules=[schedule],
        paused=paused,
        parameters=parameters,
        description="Segment new and changed images of an archive (segpipe)",
        tags=["segpipe"],
        limit=1,
    )
