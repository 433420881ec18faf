"""What an image's state sidecar says, and whether it is due.

Everything segpipe writes about an image lies under ``output_root`` at paths derived from
the image's key alone (:mod:`segpipe.archive.paths`); the sidecar records the fingerprint, model
and result settings of its last run (``SegmentConfig.result_settings()``), so :func:`decide` can
skip what is up to date. Execution settings (batch size, device, workers, scheduler) never make
an image due: they do not change the numbers.

A failure of the same inputs is retried with a growing delay, in wall time whatever the
schedule (:func:`retry_delay_s`: 10, 20, 40 minutes ... at most :data:`RETRY_MAX_DELAY_S`), for
ever, until the image, model or result settings change or a run passes ``retry_failed``: a
corrupt file would otherwise be read, fail and fill the logs on every run, and an outage (the
output disk, a share, the GPU) would otherwise hold the archive for good.

An attempt counts as a failure from its start (the "running" sidecar), so a run killed without
a word (SIGKILL, the OOM killer, a crash in a C decoder) counts too; completing resets the count.
A "running" sidecar is resumed at once until :data:`MAX_KILLED_ATTEMPTS` attempts of the same
inputs have failed or died so, then backs off like a failure, from the run's last sign of life
(the sidecar's ``alive``, refreshed while it runs). An interrupted run (KeyboardInterrupt,
SystemExit, a cancellation) is the run's end, not the image's fault: not counted, resumed at
once. A result of other inputs goes before a "running" sidecar of these says it may be
resumed; one that could not go is ``stale_result``: replaced, never resumed.
:mod:`segpipe.archive.sidecars` builds what an attempt records as it ends.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from segpipe.archive.discover import Fingerprint
from segpipe.archive.paths import ImagePaths, image_paths
from segpipe.config import SegmentConfig
from segpipe.execution.foreground import FOREGROUND_MODES
from segpipe.io.files import location
from segpipe.io.maskfiles import mask_file_sha256
from segpipe.io.places import overlap
from segpipe.results import DamagedResultError, check_shards_present, is_result, read_meta

__all__ = [
    "MAX_KILLED_ATTEMPTS",
    "RETRY_BASE_DELAY_S",
    "RETRY_MAX_DELAY_S",
    "STATE_VERSION",
    "Decision",
    "ImageOutcome",
    "ImagePaths",
    "SourceConflictError",
    "Status",
    "decide",
    "decide_unreadable",
    "image_paths",
    "read_state",
    "recorded_failures",
    "recorded_params",
    "retry_delay_s",
    "state_params",
]

log = logging.getLogger("segpipe.archive")

# 2: SegmentConfig.level may be None (the level closest to the model's pixel size)
# 3: "failures" (consecutive failures of the same inputs) and "failed_at"
STATE_VERSION = 3

# Attempts of the same inputs (failed, or killed without a word: left "running") after which
# one left "running" also waits its retry delay instead of being resumed at once: a kill by a
# scheduler or a restart is worth resuming now, a file that crashes its decoder every time is not.
MAX_KILLED_ATTEMPTS = 3
# The wait after the first failure, doubling after each up to the cap (a scanner's copy
# finishing, a share coming back: minutes; an outage: hours, retried for ever).
RETRY_BASE_DELAY_S = 600.0
RETRY_MAX_DELAY_S = 6 * 3600.0


def retry_delay_s(failures: int) -> float:
    """Seconds after the ``failures``-th failure of the same inputs before the next attempt.

    >>> [retry_delay_s(n) for n in (1, 2, 3, 10, 5000)]
    [600.0, 1200.0, 2400.0, 21600.0, 21600.0]
    """
    # The exponent capped: retried for ever, a count past ~1000 would overflow a float.
    return min(RETRY_BASE_DELAY_S * 2.0 ** min(failures - 1, 64), RETRY_MAX_DELAY_S)


@dataclass(frozen=True)
class Decision:
    """Whether an image needs segmenting, and why. ``resume`` keeps an unfinished result;
    ``held``: not processed, it failed before (see the module doc); ``failures``: consecutive
    failures of these same inputs so far; ``previous``, for a held image, its sidecar's status
    ("failed", or "running": a run that died, or one still going, which only its claim tells
    apart); ``recovered``: the image read, its sidecar holding read failures of earlier runs
    (``unreadable``) for this run to clear (:func:`~segpipe.archive.sidecars.readable_state`);
    ``moved``: up to date, its sidecar naming its old place (the archive moved), to mend."""

    process: bool
    reason: str
    resume: bool = False
    held: bool = False
    failures: int = 0
    previous: str | None = None
    recovered: bool = False
    moved: bool = False


def read_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state sidecar of an image (``ImagePaths.state``), None when there is none."""
    try:
        state = json.loads(location(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        state = None
    if not isinstance(state, dict):  # unparseable, or JSON but not an object
        log.warning("%s: unreadable state sidecar, treating the image as new", path)
        return None
    odd = [k for k, kind in _FIELD_TYPES.items() if not _is(state.get(k), kind)]
    if odd:  # a hand's edit ("failures": "many"): decide failed on it, naming no file
        log.warning(
            "%s: unreadable state sidecar (its %s is a %s), treating the image as new",
            path, odd[0], type(state[odd[0]]).__name__,
        )  # fmt: skip
        return None
    return state


# The fields decide reads, by type (each may be missing or null).
_FIELD_TYPES = {"failures": int, "fingerprint": dict, "model_sha256": str, "params": dict,
                "source": str, "status": str, "updated": str, "failed_at": str, "alive": str,
                "unreadable": dict}  # fmt: skip


def _is(value: Any, kind: type) -> bool:
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def state_params(config: SegmentConfig) -> dict[str, Any]:
    """What a state sidecar records as ``params``: the result settings of ``config`` and,
    where its foreground is a mask file, that file's sha256 (``foreground_sha256``): as for a
    result's identity, an edited mask makes another result, though its path is the same."""
    params = config.result_settings()
    if config.foreground not in FOREGROUND_MODES:
        params["foreground_sha256"] = mask_file_sha256(config.foreground)
    return params


def recorded_params(state: Mapping[str, Any]) -> Any:
    """The result settings a sidecar records (``params``) as :func:`state_params` writes them
    now, to compare with a run's: a sidecar written before a setting existed ran with that
    setting's default. Anything but a dict is returned as it is (it matches no run's).

    Raises ``TypeError`` for a ``version`` that is not a number.
    """
    params = state.get("params")
    if not isinstance(params, dict):
        return params
    if state.get("version", 1) < 2 and params.get("level") == 0:
        # Level 0 was the default then; now it is None, which for the models of then (no
        # pixel contract, so no pixel size to match) is level 0 too.
        params = params | {"level": None}
    return SegmentConfig().result_settings() | params


class SourceConflictError(FileExistsError):
    """An output root's result for a key was made from another image (another archive), or
    nothing proves it this image's (its sidecar unreadable, its metadata too)."""


def decide(
    paths: ImagePaths,
    fingerprint: Fingerprint,
    model_sha: str,
    config: SegmentConfig,
    *,
    source: str | None = None,
    retry_failed: bool = False,
) -> Decision:
    """Skip an image whose complete result was made from the same fingerprint, model and
    result settings; otherwise say why it is due, resuming an unfinished run of the same
    inputs. ``config``'s execution settings play no part.

    An image whose last run of the same inputs failed is held back until its retry delay has
    passed (:func:`retry_delay_s` of its failures, counted from ``failed_at``), however many
    times it failed; one whose last run never ended ("running": killed, or still running) is
    resumed at once, or held the same way (counted from its last sign of life, ``alive``, else
    its start, ``updated``) once it holds
    :data:`MAX_KILLED_ATTEMPTS` failures; an interrupted one is resumed at once.
    ``retry_failed`` tries a held image now.

    ``source``, the image's URL: a result recorded for another URL is that image's, moved
    (the archive remounted: the same fingerprint), or another archive's that maps to the same
    key (:class:`SourceConflictError`: never replaced, it is not this archive's to delete);
    so is a result no readable sidecar records, unless it records ``source`` itself.

    Raises :class:`SourceConflictError`, and what reading a damaged sidecar or result raises
    (an ``OSError``, a ``ValueError`` naming the result, a sidecar field's ``TypeError``).
    """
    state = read_state(paths.state)
    decision = _decide(state, paths, fingerprint, model_sha, config, source, retry_failed)
    # The image read: read failures recorded by earlier runs are over (readable_state).
    return replace(decision, recovered=True) if state and "unreadable" in state else decision


def _still_there(source: str) -> bool:
    """Whether the image a sidecar records is still at its place (True when that cannot be
    told: a URL without its storage options, an unreachable host)."""
    try:
        return location(source).exists()
    except Exception:  # fsspec's errors are its backends' own: anything unknown counts
        return True


def _decide(
    state: dict[str, Any] | None,
    paths: ImagePaths,
    fingerprint: Fingerprint,
    model_sha: str,
    config: SegmentConfig,
    source: str | None,
    retry_failed: bool,
) -> Decision:
    """:func:`decide` from the sidecar's ``state``, as read."""
    if state is None or "fingerprint" not in state:  # or a read failure all it records
        if source is not None:
            _check_unrecorded_result(paths, source)
        return Decision(True, "new image")
    moved = ""
    old_source = state.get("source")
    # The same file by another path (a link, an automount) is no other image.
    if (
        source is not None
        and old_source not in (None, source)
        and overlap(old_source, source) != "is"
    ):
        # Another image than the recorded one's, unless that one is gone: the archive was
        # moved, and this image changed since (a rescan under the same name).
        if state.get("fingerprint") != fingerprint.as_dict() and _still_there(old_source):
            raise SourceConflictError(
                f"{paths.result} is the result of {old_source}, another image than {source} "
                "(whose key maps to the same place): give each archive its own output root"
            )
        moved = f" (moved from {old_source})"
    changes = [
        what
        for what, old, new in (
            ("image changed", state.get("fingerprint"), fingerprint.as_dict()),
            ("model changed", state.get("model_sha256"), model_sha),
            ("parameters changed", recorded_params(state), state_params(config)),
        )
        if old != new
    ]
    if changes:
        return Decision(True, ", ".join(changes))
    previous = state.get("status", "unfinished")
    failures = recorded_failures(state)
    backs_off = previous == "failed" or (previous == "running" and failures >= MAX_KILLED_ATTEMPTS)
    held = _held_back(state, failures) if backs_off and not retry_failed else None
    if held is not None:
        return Decision(False, held, held=True, failures=failures, previous=previous)
    try:
        # A store that is no result is not complete; a result's metadata damaged is refused.
        recorded = previous == "complete" and is_result(paths.result)
        meta = read_meta(paths.result) if recorded else None
        complete = meta is not None and meta.complete
        made_by = meta.model_sha256 if meta is not None and complete else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{paths.result}: its result metadata cannot be read ({type(exc).__name__}: "
            f"{exc}); if it is damaged, move it away and the next attempt segments the image"
        ) from exc
    if complete and made_by != model_sha:
        return Decision(True, "result made by another model")
    if complete:
        try:  # as open_result checks it: a shard lost since (a disk, a hand) read as zeros
            check_shards_present(paths.result)
        except DamagedResultError as exc:
            return Decision(True, f"result damaged, segmenting again: {exc}", failures=failures)
        return Decision(False, "up to date" + moved, moved=bool(moved))
    if paths.result.exists():
        # Not resumable: its identity names the old URL (moved), or it is older inputs' and
        # its removal failed (stale_result): its identity (a pixel sample) may not tell.
        if moved or state.get("stale_result"):
            return Decision(
                True, f"previous run {previous}{moved}: starting again", failures=failures
            )
        return Decision(True, f"previous run {previous}: resuming", resume=True, failures=failures)
    return Decision(
        True,
        f"previous run {previous}" if previous != "complete" else "result missing",
        failures=failures,
    )


def _check_unrecorded_result(paths: ImagePaths, source: str) -> None:
    """Raise :class:`SourceConflictError` for a result that no sidecar records (none, one that
    cannot be read, one of read failures only) unless the result itself records ``source``:
    a new image's result is deleted, and with its sidecar gone only the result can tell that
    it is this image's. Anything but a result is left to delete_result, which refuses it."""
    try:
        if not is_result(paths.result):
            return
        made_from: str | None = read_meta(paths.result).source
    except (OSError, KeyError, TypeError, ValueError):  # damaged: it tells nothing
        made_from = None
    # The same file by another path (a link, an automount) is no other image, as in _decide.
    if made_from is None or (made_from != source and overlap(made_from, source) != "is"):
        raise SourceConflictError(
            f"{paths.state}: no readable state sidecar records the result {paths.result}, made "
            f"from {made_from or 'an image its metadata does not tell'}, not {source}: it may be "
            "another archive's; restore the sidecar, or move the result away to segment again"
        )


def recorded_failures(state: Mapping[str, Any]) -> int:
    """The failures in a row a sidecar records (a failed one written before counts were: 1)."""
    return int(state.get("failures", 1 if state.get("status") == "failed" else 0))


def decide_unreadable(paths: ImagePaths, *, retry_failed: bool = False) -> Decision:
    """Whether to try an image that cannot even be fingerprinted (its permissions, an I/O
    error, gone since it was listed, a store's own error): held like a failure, by the read
    failures in a row its sidecar records apart (``unreadable``: failures, failed_at, reason),
    so that its fingerprint and status stay those of its last run and :func:`decide` finds it
    as it was once it reads again."""
    record = (read_state(paths.state) or {}).get("unreadable") or {}
    failures = int(record.get("failures", 0))
    held = _held_back(record, failures) if failures and not retry_failed else None
    if held is not None:
        return Decision(False, held, held=True, failures=failures, previous="unreadable")
    return Decision(True, "unreadable", failures=failures)


def _held_back(state: dict[str, Any], failures: int) -> str | None:
    """Why a failed (or killed) image is not tried again yet, or None when its delay has
    passed: counted from the failure, or from the last sign of life of a run that never ended
    (its start, where it recorded none)."""
    if state.get("status") == "running":
        owner = state.get("owner", "a run")
        last = f"started by {owner}, never ended (killed, or still running)"
        when = state.get("alive") or state.get("updated")
    else:
        last = state.get("reason", "no reason recorded")
        # Before failed_at was recorded, "updated" was the failed run's start: a bit earlier.
        when = state.get("failed_at") or state.get("updated")
    try:
        since = dt.datetime.fromisoformat(when) if isinstance(when, str) else None
    except ValueError:
        since = None
    if since is None or since.tzinfo is None:
        return None  # no time to count from: try now rather than never
    # A time to come (a clock set wrong, a hand's edit) counts from now: at most the delay.
    retry_at = min(since, dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=retry_delay_s(failures))
    if dt.datetime.now(dt.UTC) >= retry_at:
        return None
    at = retry_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    times = "time" if failures == 1 else "times"
    now = "--retry-failed, retry_failed=True"
    return f"failed {failures} {times}; next attempt after {at} (or now: {now}); last: {last}"


# held: failed (or killed, see MAX_KILLED_ATTEMPTS) with the same inputs, waiting for its
# retry delay; changed: segmented, but the image changed meanwhile: not recorded, due again
# next run.
Status = Literal["segmented", "skipped", "busy", "failed", "held", "changed"]


@dataclass(frozen=True)
class ImageOutcome:
    """What a run did with one image, for the run's table and logs."""

    image: str  # key
    status: Status
    reason: str
    result: str | None = None
    report: str | None = None
    thumbnail: str | None = None
    tiles_computed: int | None = None
    tiles_skipped: int | None = None
    seconds: float | None = None
    megapixels_per_second: float | None = None

    @classmethod
    def failure(cls, image: str, error: BaseException) -> ImageOutcome:
        """A failed image, its reason the exception type and message."""
        return cls(image=image, status="failed", reason=f"{type(error).__name__}: {error}")

    def as_row(self) -> dict[str, Any]:
        return asdict(self)
