"""What an image's state sidecar says when an attempt ends, or when its image cannot be read.

The fields and how :func:`~segpipe.archive.state.decide` reads them back are
:mod:`segpipe.archive.state`'s; these build the sidecars :func:`segpipe.archive.process_image`
writes: a failure, the run's stop ("interrupted"), a result whose image changed meanwhile, a
stale result that could not be removed, a read failure and its end.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Mapping
from typing import Any

from segpipe.archive.state import (
    STATE_VERSION,
    ImagePaths,
    image_paths,
    read_state,
    recorded_failures,
    recorded_params,
)
from segpipe.io.files import utc_now

__all__ = [
    "RUN_STOPS",
    "changed_state",
    "ended_state",
    "killed_last",
    "readable_state",
    "stale_state",
    "undecided_state",
    "unreadable_state",
]

# Exceptions that are the run's stop, not the image's failure: a future cancelled because the
# run or its cluster is closing (Dask's FutureCancelledError: its client closed, its scheduler
# restarted or gone). Every other stop is a BaseException (KeyboardInterrupt, SystemExit,
# RunStopped, Prefect's TerminationSignal).
RUN_STOPS: tuple[type[Exception], ...] = (concurrent.futures.CancelledError,)


def ended_state(exc: BaseException, failures_before: int) -> dict[str, Any]:
    """The state of an attempt that raised ``exc``. An Exception is the image's failure,
    counted already (the "running" state counts the attempt); anything else (KeyboardInterrupt,
    SystemExit, a Prefect cancellation, one of :data:`RUN_STOPS`) stopped the run, not the
    image: "interrupted", with the count before the attempt, resumed at once by the next run."""
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Exception) and not isinstance(exc, RUN_STOPS):
        return {"status": "failed", "reason": reason, "failed_at": utc_now()}
    return {
        "status": "interrupted",
        "reason": reason,
        "failures": failures_before,
        "updated": utc_now(),
    }


def stale_state(
    running: Mapping[str, Any], exc: BaseException, failures_before: int
) -> dict[str, Any]:
    """The state of an attempt (``running``: its "running" state) that could not remove the
    result of older inputs before it started (the user's data at the result's path, a store's
    error): ended by ``exc`` (:func:`ended_state`), its result marked ``stale_result``, so that
    no later attempt of these inputs resumes it."""
    return {**running, **ended_state(exc, failures_before), "stale_result": True}


def changed_state(failures_before: int) -> dict[str, Any]:
    """The state of a result made while its image changed: not complete, so due again (its
    fingerprint is no longer the recorded one); not a failure, so not counted as one."""
    return {
        "status": "changed",
        "reason": "image changed while segmenting",
        "failures": failures_before,
        "updated": utc_now(),
    }


def unreadable_state(
    paths: ImagePaths, key: str, source: str, error: Exception, failures_before: int
) -> dict[str, Any]:
    """The sidecar of an image that could not be read: its last run's as it was (the file may
    be unchanged: an I/O error, a permission restored), the read failures in a row apart."""
    state = read_state(paths.state) or {"version": STATE_VERSION, "image": key, "source": source}
    reason = f"{type(error).__name__}: {error}"
    failure = {"failures": failures_before + 1, "reason": reason, "failed_at": utc_now()}
    return state | {"unreadable": failure}


def readable_state(paths: ImagePaths) -> dict[str, Any] | None:
    """The sidecar of an image that reads again: as it is, less the read failures of earlier
    runs (``unreadable``), so that a later one counts from one again; None when it records
    none (nothing to write)."""
    state = read_state(paths.state) or {}
    return {k: v for k, v in state.items() if k != "unreadable"} if "unreadable" in state else None


def undecided_state(
    paths: ImagePaths, run: Mapping[str, Any], error: Exception, *, unreadable: bool
) -> dict[str, Any]:
    """The sidecar of an image whose :func:`~segpipe.archive.state.decide` raised ``error`` (a
    result or sidecar that cannot be read): a failed run of ``run``'s inputs (a starting run's
    sidecar less its status and count), counted on from the failures the sidecar records for
    the same inputs, so that it backs off like any failure; for an ``unreadable`` image (its
    inputs unknown), a read failure (:func:`unreadable_state`). Its result is left as it is,
    marked stale (:func:`stale_state`) unless the sidecar recorded these inputs for it."""
    if unreadable:
        return unreadable_state(paths, run["image"], run["source"], error, 0)
    state = read_state(paths.state) or {}
    try:
        # As decide compares them: an older release's sidecar records the same inputs too.
        same = recorded_params(state) == run["params"] and all(
            state.get(k) == run[k] for k in ("fingerprint", "model_sha256")
        )
    except TypeError:  # a version that is no number: the field deciding failed on, maybe
        same = False
    try:
        before = recorded_failures(state) if same else 0
    except (TypeError, ValueError):  # the field deciding failed on, maybe
        before = 0
    failed = {**run, "failures": before + 1, "updated": utc_now(), **ended_state(error, before)}
    if not same or state.get("stale_result"):
        failed["stale_result"] = True
    return failed


def killed_last(images: list[Any], output_root: str | os.PathLike[str]) -> list[Any]:
    """``images`` (each with a ``key``), those whose last attempt never ended moved to the end
    (a "running" sidecar: killed, say by the OOM killer or a crash in a C decoder): first in
    order, such a file killed every run before the images after it could start."""

    def died(image: Any) -> bool:
        try:  # unreadable here (a permission, a store's hiccup): its own attempt says so
            state = read_state(image_paths(output_root, image.key).state) or {}
        except (OSError, ValueError):  # or a key no output can have (image_paths)
            return False
        return state.get("status") == "running"

    return sorted(images, key=died)  # stable: the others keep their order
