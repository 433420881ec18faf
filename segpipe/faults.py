"""Named fault points: where the tests kill or break a run on purpose.

Code that changes a result's state calls :func:`fault_point` at each transition. Normally it
does nothing (one environment lookup). With ``SEGPIPE_FAULT=<name>`` (or ``<name>:kill``) the
process kills itself with SIGKILL there, as a crash or an OOM killer would; ``<name>:raise``
raises :class:`InjectedFault` instead, ``<name>:term`` sends the process SIGTERM (a
service manager's stop) and ``<name>:int`` SIGINT (Ctrl-C). ``SEGPIPE_FAULT_SKIP=N`` lets the
point pass ``N`` times first (e.g. kill after the third block). The fault tests run segpipe in
a subprocess with these set and check that the re-run finishes bit-identical.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_POINTS", "InjectedFault", "fault_point"]

# Every point the code declares, in the order a run passes them.
FAULT_POINTS = (
    "result.deleting",  # a replaced result is renamed aside, not yet deleted (overwrite only)
    "result.skeleton",  # the new store is built beside its path, not yet renamed into place
    "result.created",  # the store is at its path, nothing computed
    "block.written",  # a block's shard is written, not yet recorded as done
    "block.recording",  # a block's record is written in one of the progress chunks it spans
    "block.recorded",  # a block is recorded in tiles_done
    "result.pyramid",  # every tile is done and the pyramid built, nothing consolidated
    "result.consolidated",  # metadata consolidated, ``complete`` not yet written
)

_passed: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised at a fault point by ``SEGPIPE_FAULT=<name>:raise`` (tests only)."""


def fault_point(name: str) -> None:
    """Kill or raise here if ``SEGPIPE_FAULT`` names this point (see the module doc)."""
    spec = os.environ.get("SEGPIPE_FAULT")
    if not spec:
        return
    point, _, action = spec.partition(":")
    if point not in FAULT_POINTS or action not in ("", "kill", "raise", "term", "int"):
        raise ValueError(
            f"SEGPIPE_FAULT={spec!r} names no fault point and action; the points are "
            f"{', '.join(FAULT_POINTS)}, the actions kill (default), raise, term and int"
        )
    if point != name:
        return
    seen = _passed.get(name, 0)
    _passed[name] = seen + 1
    if seen < int(os.environ.get("SEGPIPE_FAULT_SKIP", "0")):
        return
    if action == "raise":
        raise InjectedFault(f"fault injected at {name!r}")
    sent = {"term": signal.SIGTERM, "int": signal.SIGINT}.get(action, signal.SIGKILL)
    os.kill(os.getpid(), sent)
