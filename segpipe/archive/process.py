"""One image, start to finish: fingerprint, decide, claim, segment, report, catalog."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from segpipe.archive import catalog, reports
from segpipe.archive.claims import read_lock, try_claim
from segpipe.archive.discover import ArchiveImage, filesystem, fingerprint_image, model_sha256
from segpipe.archive.state import (
    STATE_VERSION,
    ImageOutcome,
    ImagePaths,
    SegmentParams,
    Status,
    decide,
    image_paths,
)
from segpipe.io.files import utc_now, write_json_atomic
from segpipe.results import read_meta

__all__ = ["process_image"]

log = logging.getLogger("segpipe.archive")

SegmentFn = Callable[..., Any]


def process_image(
    image: ArchiveImage,
    output_root: str | os.PathLike[str],
    model: str | os.PathLike[str] = "tissue-unet",
    *,
    params: SegmentParams | None = None,
    model_sha: str | None = None,
    segment_options: Mapping[str, Any] | None = None,
    owner: str | None = None,
    ttl_s: float = 600.0,
    storage_options: Mapping[str, Any] | None = None,
    run_segment: SegmentFn | None = None,
) -> ImageOutcome:
    """Fingerprint, decide, claim, segment, report and catalog one image.

    Parameters
    ----------
    image
        From :func:`discover_images`.
    output_root
        Where results, reports and the catalog go.
    model
        A shipped model's name or a checkpoint path.
    params
        Parameters that shape the result (default :class:`SegmentParams()`).
    model_sha
        The model's sha256 when the caller computed it once for many images.
    segment_options
        Execution options for :func:`segpipe.segment` (``device``, ``scheduler``,
        ``n_workers``, ``batch_size``, ``on_progress``).
    owner, ttl_s
        The claim's owner label and staleness timeout (:func:`try_claim`).
    storage_options
        fsspec options for a remote archive.
    run_segment
        Called as ``run_segment(source, output, model, **params, **segment_options)``;
        default :func:`segpipe.segment`. Flows pass a Prefect task here, for its retries.

    Returns
    -------
    ImageOutcome
        ``segmented``, ``skipped`` (up to date) or ``busy`` (another run holds the claim).

    Raises
    ------
    Exception
        Whatever segmenting raised (e.g. :class:`~segpipe.io.readers.ImageReadError` naming a
        corrupt file), after the failure is written to the state sidecar and the claim is
        released.
    """

    params = params or SegmentParams()
    model_sha = model_sha or model_sha256(model)
    paths = image_paths(output_root, image.key)
    fingerprint = fingerprint_image(image, storage_options=storage_options)
    decision = decide(paths, fingerprint, model_sha, params)
    if not decision.process:
        if not catalog.record_path(output_root, image.key).exists():
            # e.g. the catalog folder was deleted: index the result again, no claim needed
            catalog.record_result(
                output_root,
                image.key,
                paths.result,
                source=image.url,
                fingerprint=fingerprint.as_dict(),
            )
        return _skipped(image.key, paths, decision.reason)
    claim = try_claim(paths.lock, owner=owner, ttl_s=ttl_s)
    if claim is None:
        holder = (read_lock(paths.lock) or {}).get("owner", "another run")
        return ImageOutcome(image.key, "busy", f"claimed by {holder}")
    with claim:
        # Decide again under the claim: another run may have finished it since.
        decision = decide(paths, fingerprint, model_sha, params)
        if not decision.process:
            return _skipped(image.key, paths, decision.reason)
        log.info("%s: segmenting (%s)", image.key, decision.reason)
        if not decision.resume:
            catalog.remove_record(output_root, image.key)
            _remove_result(paths.result)
        state = {
            "version": STATE_VERSION,
            "image": image.key,
            "source": image.url,
            "fingerprint": fingerprint.as_dict(),
            "model": str(model),
            "model_sha256": model_sha,
            "params": params.as_dict(),
            "status": "running",
            "owner": claim.owner,
            "updated": utc_now(),
        }
        write_json_atomic(paths.state, state)
        segment = run_segment or _library_segment()
        try:
            with _local_copy(image, output_root, storage_options) as local:
                segment(local, paths.result, model, **params.as_dict(), **(segment_options or {}))
                claim.check()
                reports.write_thumbnail(local, paths.result, paths.thumbnail, level=params.level)
        except BaseException as exc:
            if claim.is_held():
                write_json_atomic(
                    paths.state,
                    state | {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"},
                )
            raise
        claim.check()
        text = reports.image_report(paths.result, image=image.key, thumbnail=paths.thumbnail)
        paths.report.write_text(text, encoding="utf-8")
        catalog.record_result(
            output_root,
            image.key,
            paths.result,
            source=image.url,
            fingerprint=fingerprint.as_dict(),
        )
        write_json_atomic(paths.state, state | {"status": "complete", "updated": utc_now()})
    return _from_result(image.key, paths, "segmented", decision.reason)


def _library_segment() -> SegmentFn:
    from segpipe.execution.segment import (
        segment,  # torch loads here, not when the archive is listed
    )

    return segment


def _skipped(key: str, paths: ImagePaths, reason: str) -> ImageOutcome:
    outcome = _from_result(key, paths, "skipped", reason)
    # A skipped image computed nothing in this run, whatever its result once took.
    return replace(outcome, tiles_computed=0, seconds=0.0, megapixels_per_second=None)


def _from_result(key: str, paths: ImagePaths, status: Status, reason: str) -> ImageOutcome:
    meta = read_meta(paths.result)
    return ImageOutcome(
        image=key,
        status=status,
        reason=reason,
        result=str(paths.result),
        report=str(paths.report) if paths.report.exists() else None,
        thumbnail=str(paths.thumbnail) if paths.thumbnail.exists() else None,
        tiles_computed=meta.get("tiles_computed"),
        tiles_skipped=meta.get("tiles_skipped"),
        seconds=meta.get("seconds"),
        megapixels_per_second=meta.get("megapixels_per_second"),
    )


def _remove_result(result: Path) -> None:
    """Delete a stale result of older inputs; refuse anything that is not a segpipe result."""
    if not result.exists():
        return
    try:
        read_meta(result)
    except (FileNotFoundError, ValueError) as exc:
        raise FileExistsError(
            f"{result} exists and is not a segpipe result; move it away, segpipe will not delete it"
        ) from exc
    shutil.rmtree(result)


@contextlib.contextmanager
def _local_copy(
    image: ArchiveImage,
    output_root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
) -> Iterator[str]:
    """A local path of the image: itself, or a download of a remote one, removed after.

    The download's path depends on the key alone: the result records its source path, and a
    resumed run must present the same one.
    """
    if image.is_local:
        yield image.url
        return
    fs, path = filesystem(image.url, storage_options)
    local = Path(output_root, "_staging", *PurePosixPath(image.key).parts)
    local.parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(local))
    try:
        yield str(local)
    finally:
        local.unlink(missing_ok=True)
