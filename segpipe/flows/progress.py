"""Stages of a flow's work as Prefect progress artifacts and log lines.

A task installs :class:`ProgressArtifacts` around its library call (``also_reporting``, so a
CLI's terminal bars stay): each stage with a known total becomes one progress artifact, keyed
by the stage and what it works on (:func:`artifact_key`), updated as the stage advances, and a
line in the run's log at every tenth. The artifacts show on the run's page in the Prefect UI
and, by key, on the Artifacts page.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from typing import Any, cast
from uuid import UUID

from segpipe.progress import Event, describe

__all__ = ["ProgressArtifacts", "artifact_key"]

log = logging.getLogger("segpipe")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) naming ``parts``: a readable
    slug plus a hash of the parts, so that different images never share a key and the same
    image keeps its key from run to run (Prefect groups an artifact's versions by key).

    A long slug keeps its first part (what the artifact is: ``report-``, ``archive-``, which
    the Artifacts page is searched by) and the end of the rest.

    >>> artifact_key("report", "/data/out", "Day 1/Slide_A.svs")[:27]
    'report-data-out-day-1-slide'
    >>> artifact_key("report", "/mnt/lab/pathology/results", "2024/scanner-2/slide-00123.svs")
    'report-lab-pathology-results-2024-scanner-2-slide-00123-svs-dbfe5333d8'
    """

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    head, rest = slug(parts[0]) if parts else "", slug("-".join(parts[1:]))
    room = max(60 - len(head) - 1, 0)
    rest = rest[-room:].strip("-") if len(rest) > room else rest
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]
    return "-".join(p for p in (head, rest, digest) if p)


class ProgressArtifacts:
    """Listener (:mod:`segpipe.progress`) for a Prefect task run: a progress artifact per
    stage, ``artifact_key(stage, *subject)``, updated when its percentage has grown by
    ``every_percent`` and at the end; the run logger gets a line at every tenth. ``stages``:
    only those (default: all), for a listener that tasks started inside its block inherit.

    Reporting is best effort: a failing artifact call (a server that went away) is logged once
    and the stage's artifact is left as it was; the work goes on.
    """

    def __init__(
        self,
        *subject: str,
        every_percent: float = 1.0,
        logger: Any | None = None,
        stages: tuple[str, ...] | None = None,
    ) -> None:
        self.subject = subject
        self.stages = stages
        self.every_percent = every_percent
        self.logger = logger if logger is not None else _run_logger()
        self._artifacts: dict[int, tuple[UUID, float]] = {}  # stage id -> (id, percent shown)
        self._tenths: dict[int, int] = {}
        self._broken = False
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if self.stages is not None and event.stage not in self.stages:
            return
        with self._lock:
            self._log(event)
            if event.total:
                self._show(event, 100.0 * min(event.done, event.total) / event.total)

    def _log(self, event: Event) -> None:
        tenth = 10 * event.done // event.total if event.total else 0
        if event.kind != "advance" or tenth > self._tenths.get(event.stage_id, 0):
            self._tenths[event.stage_id] = tenth
            self.logger.info("%s", describe(event))

    def _show(self, event: Event, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self._broken:
            return
        text = f"{describe(event)} ({' '.join(self.subject)})"
        try:
            if event.kind == "start":
                key = artifact_key(event.stage, *self.subject)
                # Sync here (no event loop runs this thread); typed as either by async_dispatch.
                created = cast(UUID, create_progress_artifact(percent, key=key, description=text))
                self._artifacts[event.stage_id] = (created, percent)
                return
            artifact, shown = self._artifacts.get(event.stage_id, (None, 0.0))
            if artifact is None:
                return
            if event.kind == "end" or percent - shown >= self.every_percent:
                update_progress_artifact(artifact, percent, description=text)
                self._artifacts[event.stage_id] = (artifact, percent)
            if event.kind == "end":
                del self._artifacts[event.stage_id]
        except Exception as err:  # a progress display never fails the run
            self._broken = True
            log.warning("no more Prefect progress artifacts for this task: %s", err)


def _run_logger() -> Any:
    """The Prefect run logger inside a flow or task run, else segpipe's logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log
