"""One image, start to finish: fingerprint, decide, claim, segment, report, catalog."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.archive import catalog, reports
from segpipe.archive.claims import Claim, read_lock, try_claim
from segpipe.archive.discover import ArchiveImage, Fingerprint, fingerprint_image
from segpipe.archive.sidecars import (
    RUN_STOPS,
    changed_state,
    ended_state,
    readable_state,
    stale_state,
    undecided_state,
    unreadable_state,
)
from segpipe.archive.state import (
    STATE_VERSION,
    Decision,
    ImageOutcome,
    ImagePaths,
    SourceConflictError,
    Status,
    decide,
    decide_unreadable,
    image_paths,
    read_state,
    state_params,
)
from segpipe.archive.watch import (
    CLAIM_CHECK_INTERVAL_S,
    RunStopped,
    names_parameter,
    stop_when_lost,
)
from segpipe.config import SegmentConfig
from segpipe.io.files import URLPath, location, utc_now, write_json_atomic, write_text_atomic
from segpipe.io.places import public_url
from segpipe.results import ResultMismatchError, delete_result, read_meta

if TYPE_CHECKING:
    import torch

__all__ = ["LoadedModel", "RunStopped", "load_model", "process_image"]

log = logging.getLogger("segpipe.archive")

SegmentFn = Callable[..., Any]

# The sampled hash of an unreadable image's fingerprint: a placeholder, never recorded (the
# sidecar keeps the last real one) nor compared (decide_unreadable).
_UNREADABLE = "unreadable"
# Raised while reading or deciding, yet no failure of the image: another archive's result (its
# sidecar is not this run's to write), the run's stop (a cancelled future is an Exception).
_NOT_THE_IMAGES: tuple[type[Exception], ...] = (SourceConflictError, *RUN_STOPS)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model loaded once for a whole run over an archive.

    ``name`` is what results and state sidecars record (the shipped name or checkpoint path
    given, not the architecture's), ``sha256`` its :func:`segpipe.models.fingerprint`.
    """

    name: str
    module: torch.nn.Module = field(repr=False)
    sha256: str


def load_model(model: str | os.PathLike[str] | LoadedModel) -> LoadedModel:
    """Load and fingerprint a shipped model (by name) or a checkpoint, once for many images."""
    if isinstance(model, LoadedModel):
        return model
    from segpipe import models  # torch loads here, not when the archive is listed

    net = models.load(model)
    return LoadedModel(name=models.label_of(model), module=net, sha256=models.fingerprint(net))


def process_image(
    image: ArchiveImage,
    output_root: str | os.PathLike[str],
    model: str | os.PathLike[str] | LoadedModel = "tissue-unet",
    *,
    config: SegmentConfig | None = None,
    owner: str | None = None,
    ttl_s: float = 600.0,
    storage_options: Mapping[str, Any] | None = None,
    run_segment: SegmentFn | None = None,
    retry_failed: bool = False,
    stop: threading.Event | None = None,
) -> ImageOutcome:
    """Fingerprint, decide, claim, segment, report and catalog one image.

    Parameters
    ----------
    image
        From :func:`discover_images`.
    output_root
        Where results, reports and the catalog go: a local folder or an fsspec URL
        (``s3://bucket/segpipe``; claims there need S3's conditional writes, see
        :mod:`segpipe.archive.claims`).
    model
        A shipped model's name, a checkpoint path, or a :class:`LoadedModel` from
        :func:`load_model` when many images share it (loaded and hashed once).
    config
        The segmentation's settings (default ``SegmentConfig()``). Its result settings are
        recorded in the state sidecar: changing one makes the image due again; changing an
        execution setting (``batch_size``, ``device``, ``n_workers``, ``scheduler``) does not.
    owner, ttl_s
        The claim's owner label and staleness timeout (:func:`try_claim`).
    storage_options
        fsspec options (endpoint, credentials) for an archive or ``output_root`` at a URL. A
        remote image is read by byte ranges as tiles are needed, never downloaded whole.
    run_segment
        Called like :func:`segpipe.segment`, as ``run_segment(source, output, module, config,
        model_name=name)`` with the loaded module; default :func:`segpipe.segment`. Flows
        pass a Prefect task here, for its retries. One that names an ``on_progress``
        parameter gets the claim check that stops a run which lost its claim.
    retry_failed
        Try an image that failed with the same inputs now, whatever its failures and retry
        delay (:func:`~segpipe.archive.state.decide`).
    stop
        Set by the caller when its run stops, from another thread: the image stops before it
        starts segmenting or at segment's next progress report (with the ``on_progress`` as
        for ``run_segment``), raising :class:`RunStopped`.

    Returns
    -------
    ImageOutcome
        ``segmented``, ``skipped`` (up to date), ``busy`` (another run holds the claim),
        ``held`` (failed, or killed :data:`~segpipe.archive.state.MAX_KILLED_ATTEMPTS`
        times, with the same inputs: waiting for its retry delay) or ``changed`` (the file
        changed while it was segmented: nothing recorded, the next run does it again).

    Raises
    ------
    Exception
        Whatever reading the image, deciding (a damaged result or sidecar), removing an older
        result (``FileExistsError``: no segpipe result there, kept) or segmenting raised (e.g.
        :class:`~segpipe.io.readers.ImageReadError` naming a corrupt file), after the failure
        is written to the state sidecar and the claim is released.
    BaseException
        KeyboardInterrupt, SystemExit, a cancellation, :class:`RunStopped` (and a cancelled
        future, an Exception): the sidecar says "interrupted", the attempt is not counted as a
        failure, and the next run resumes the image at once.
    """
    config = config or SegmentConfig()
    loaded = load_model(model)
    output_root = location(output_root, storage_options)
    source = location(image.url, storage_options)
    paths = image_paths(output_root, image.key)
    unreadable: Exception | None = None
    try:
        fingerprint = fingerprint_image(image, storage_options=storage_options)
    except _NOT_THE_IMAGES:
        raise
    except Exception as exc:
        # Unreadable (permissions, an I/O error, gone since it was listed, a store's error): a
        # failure that backs off like any other, but recorded beside the sidecar's fingerprint
        # and status, not over them: once it reads again unchanged, its result is up to date.
        fingerprint = Fingerprint(image.size, image.mtime, _UNREADABLE)
        unreadable = exc

    def due() -> Decision:
        if unreadable is not None:
            return decide_unreadable(paths, retry_failed=retry_failed)
        return decide(
            paths, fingerprint, loaded.sha256, config, source=image.url, retry_failed=retry_failed
        )

    try:
        decision = due()
    except _NOT_THE_IMAGES:
        raise
    except Exception:  # the image's failure: its claim's holder decides again and records it
        decision = Decision(True, "deciding failed")
    # A "running" sidecar held back may be a live run's (its attempts counted as they start):
    # the claim tells a live run (busy) from a dead one (held).
    running = decision.held and decision.previous == "running"
    if (
        not decision.process
        and not running
        and not decision.recovered
        and not decision.moved
        and (decision.held or not _missing_outputs(output_root, image, paths))
    ):
        _release_dead_lock(paths, owner, ttl_s)
        return _not_processed(image.key, paths, decision)
    # Due, or up to date but missing its catalog record, report or thumbnail (deleted): either
    # way they are written under the claim, as a run replacing the result may be removing them.
    claim = try_claim(paths.lock, owner=owner, ttl_s=ttl_s)
    if claim is None:
        if not decision.process and not running:  # the holder or the next run records it
            return _not_processed(image.key, paths, decision)
        holder = (read_lock(paths.lock) or {}).get("owner", "another run")
        return ImageOutcome(image.key, "busy", f"claimed by {holder}")
    with claim:
        run = {  # the inputs a run records in the sidecar
            "version": STATE_VERSION,
            "image": image.key,
            "source": image.url,
            "fingerprint": fingerprint.as_dict(),
            "model": loaded.name,
            "model_sha256": loaded.sha256,
            "params": state_params(config),
            "owner": claim.owner,
        }
        # Decide again under the claim: another run may have finished it since.
        try:
            decision = due()
        except _NOT_THE_IMAGES:
            raise
        except Exception as exc:  # a failure like any other: recorded, so that it backs off
            failed = undecided_state(paths, run, exc, unreadable=unreadable is not None)
            write_json_atomic(paths.state, failed)
            raise
        run_source = {"source": image.url}
        if decision.recovered and (readable := readable_state(paths)) is not None:
            write_json_atomic(paths.state, readable)
        if not decision.process:
            if decision.moved:
                # Named at its new place: another image at the old one is then another
                # archive's (SourceConflictError), never this result's replacement.
                claim.check()
                write_json_atomic(paths.state, (read_state(paths.state) or {}) | run_source)
            missing = set() if decision.held else _missing_outputs(output_root, image, paths)
            missing |= {"report"} if decision.moved else set()  # it names the source
            if missing - {"record"}:
                _write_reports(source, image.key, paths, claim, only=missing)
            if decision.moved or "record" in missing:
                claim.check()
                _index(output_root, image, paths, fingerprint)
            return _not_processed(image.key, paths, decision)
        if unreadable is not None:
            failed = unreadable_state(paths, image.key, image.url, unreadable, decision.failures)
            write_json_atomic(paths.state, failed)
            raise unreadable
        # The attempt counts as a failure until it ends: a run killed without a word (a
        # SIGKILL, the OOM killer, a crash in a C decoder) is counted too.
        state = run | {"status": "running", "failures": decision.failures + 1, "updated": utc_now()}
        if stop is not None and stop.is_set():
            raise RunStopped
        log.info("%s: segmenting (%s)", image.key, decision.reason)
        if not decision.resume:
            # Gone before "running" says these inputs may resume it; else a failure like any
            # other (the user's data there, a store's error), its result marked stale.
            try:
                catalog.remove_record(output_root, image.key)  # a record of what goes now
                _remove_result(paths)
            except Exception as exc:
                if claim.is_held():
                    write_json_atomic(paths.state, stale_state(state, exc, decision.failures))
                raise
        write_json_atomic(paths.state, state)
        segment = run_segment or _library_segment()
        # Only when given: a run_segment written before storage options need not take them.
        extra: dict[str, Any] = (
            {"storage_options": dict(storage_options)} if storage_options else {}
        )
        if run_segment is None or names_parameter(run_segment, "on_progress"):
            extra["on_progress"] = stop_when_lost(
                claim,
                CLAIM_CHECK_INTERVAL_S,
                alive=lambda: write_json_atomic(paths.state, state | {"alive": utc_now()}),
                stop=stop,
            )
        args = (image.url, paths.result, loaded.module, config)
        try:
            try:
                segment(*args, model_name=loaded.name, **extra)
            except ResultMismatchError as exc:
                if not decision.resume:
                    raise
                # Resumable by the archive's fingerprint, yet refused by segment (its pixel
                # sample, or a setting resolved otherwise by this release): the result is the
                # archive's own to replace, so start again rather than fail every run.
                log.warning("%s: %s; starting again", image.key, exc)
                claim.check()  # what goes is the holder's to remove
                catalog.remove_record(output_root, image.key)  # a record of what goes now
                _remove_result(paths)
                segment(*args, model_name=loaded.name, **extra)
            claim.check()
            # A file still being written (a scanner, a copy) would be recorded with the
            # fingerprint taken before and look up to date for good.
            if fingerprint_image(image, storage_options=storage_options) != fingerprint:
                meanwhile = changed_state(decision.failures)
                claim.check()  # the sidecar is the holder's to write
                write_json_atomic(paths.state, state | meanwhile)
                changed = _from_result(image.key, paths, "changed", meanwhile["reason"])
                # A report or thumbnail there is an older result's, not this one's.
                return replace(changed, report=None, thumbnail=None)
            # Inside the try: a report or catalog that cannot be written fails the image with
            # its reason, where it left the state "running" for good.
            _write_reports(source, image.key, paths, claim)
            claim.check()
            _index(output_root, image, paths, fingerprint)
        except BaseException as exc:
            if claim.is_held():
                write_json_atomic(paths.state, state | ended_state(exc, decision.failures))
            raise
        claim.check()  # "complete" is the holder's word only
        write_json_atomic(
            paths.state, state | {"status": "complete", "failures": 0, "updated": utc_now()}
        )
    return _from_result(image.key, paths, "segmented", decision.reason)


def _release_dead_lock(paths: ImagePaths, owner: str | None, ttl_s: float) -> None:
    """Remove the lock of a run killed after its last write (its holder gone, or silent for
    ``ttl_s``), which no later run would: the image is up to date. A live holder's stays."""
    try:
        if paths.lock.exists() and (claim := try_claim(paths.lock, owner=owner, ttl_s=ttl_s)):
            claim.release()
    except OSError as exc:  # a read-only output root: the image is still up to date
        log.info("%s: its dead lock cannot be removed (%s)", paths.lock, exc)


def _missing_outputs(
    output_root: Path | URLPath, image: ArchiveImage, paths: ImagePaths
) -> set[str]:
    """Which of an image's catalog record, report and thumbnail are missing (deleted since),
    or name another result path (the output root moved or copied: the old one, or none)."""
    record = catalog.record_path(output_root, image.key)
    made = {"record": record, "report": paths.report, "thumbnail": paths.thumbnail}
    due = {what for what, path in made.items() if not path.exists()}
    recorded = None if "record" in due else catalog.recorded_result(output_root, image.key)
    return due | ({"record", "report"} if recorded not in (None, str(paths.result)) else set())


def _write_reports(
    source: Path | URLPath, key: str, paths: ImagePaths, claim: Claim,
    only: Collection[str] = ("thumbnail", "report"),
) -> None:  # fmt: skip
    """Write the result's thumbnail, then its report (which shows the thumbnail), or ``only``
    those of them named, each under the claim."""
    if "thumbnail" in only:
        level = read_meta(paths.result).config.level or 0  # the level segment() chose
        claim.check()
        reports.check_made(paths.thumbnail, "thumbnail")
        reports.write_thumbnail(source, paths.result, paths.thumbnail, level=level)
    if "report" in only:
        now = public_url(str(source))  # the image's place now: moved, it was elsewhere
        text = reports.image_report(paths.result, image=key, thumbnail=paths.thumbnail, source=now)
        claim.check()
        reports.check_made(paths.report, "report")
        write_text_atomic(paths.report, text)


def _index(
    output_root: Path | URLPath, image: ArchiveImage, paths: ImagePaths, fingerprint: Fingerprint
) -> None:
    """Record ``image``'s result in the archive's catalog."""
    catalog.record_result(
        output_root, image.key, paths.result, source=image.url, fingerprint=fingerprint.as_dict()
    )


def _library_segment() -> SegmentFn:
    from segpipe.execution.segment import (
        segment,  # torch loads here, not when the archive is listed
    )

    return segment


def _not_processed(key: str, paths: ImagePaths, decision: Decision) -> ImageOutcome:
    """A held image's outcome (it may have no result at all), or an up-to-date one's."""
    if decision.held:
        return ImageOutcome(key, "held", decision.reason)
    return _skipped(key, paths, decision.reason)


def _skipped(key: str, paths: ImagePaths, reason: str) -> ImageOutcome:
    outcome = _from_result(key, paths, "skipped", reason)
    # A skipped image computed nothing in this run, whatever its result once took, and looked
    # at no tile: the tiles its last run found done were shown as this run's.
    return replace(
        outcome, tiles_computed=0, tiles_skipped=None, seconds=0.0, megapixels_per_second=None
    )


def _from_result(key: str, paths: ImagePaths, status: Status, reason: str) -> ImageOutcome:
    summary = read_meta(paths.result).summary
    return ImageOutcome(
        image=key,
        status=status,
        reason=reason,
        result=str(paths.result),
        report=str(paths.report) if paths.report.exists() else None,
        thumbnail=str(paths.thumbnail) if paths.thumbnail.exists() else None,
        tiles_computed=summary.tiles_computed if summary else None,
        tiles_skipped=summary.tiles_skipped if summary else None,
        seconds=summary.seconds if summary else None,
        megapixels_per_second=summary.megapixels_per_second if summary else None,
    )


def _remove_result(paths: ImagePaths) -> None:
    """Delete a stale result (:func:`segpipe.results.delete_result`: never half-deleted), then
    its report and thumbnail (a deleted result's numbers); refuse what is not a result, and
    a file of the user's where the report or thumbnail goes (kept, as the result is)."""
    reports.check_made(paths.report, "report")
    reports.check_made(paths.thumbnail, "thumbnail")
    try:
        delete_result(paths.result)
    except ResultMismatchError as exc:  # the archive's wording: the user's data, kept
        raise FileExistsError(str(exc)) from exc
    for made in (paths.report, paths.thumbnail):
        made.unlink(missing_ok=True)
