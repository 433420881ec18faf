"""Progress of a run's stages (ingest, tissue mask, segment, pyramid), told to one listener.

Library code announces stages and advances them; it never prints. Whoever drives a run (the
CLI, a flow) installs a listener with :func:`reporting` that turns events into terminal bars,
plain lines or Prefect artifacts. With no listener, stages cost a context-variable lookup.

>>> events = []
>>> with reporting(events.append):
...     with stage("pyramid", total=2, unit="level") as s:
...         s.advance()
...         s.advance()
>>> [(e.kind, e.done) for e in events]
[('start', 0), ('advance', 1), ('advance', 2), ('end', 2)]
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Event", "Listener", "Stage", "reporting", "stage"]

EventKind = Literal["start", "advance", "end"]


@dataclass(frozen=True)
class Event:
    """One change of a stage: started, advanced to ``done`` of ``total`` units, or ended."""

    kind: EventKind
    stage: str
    done: int
    total: int | None
    unit: str
    elapsed_s: float


Listener = Callable[[Event], None]

_LISTENER: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "segpipe_progress_listener", default=None
)


@dataclass
class Stage:
    """A running stage; :meth:`advance` as units of work finish."""

    name: str
    total: int | None
    unit: str
    done: int = 0
    _listener: Listener | None = None
    _started: float = field(default_factory=time.perf_counter)

    def _emit(self, kind: EventKind) -> None:
        if self._listener is not None:
            elapsed = time.perf_counter() - self._started
            self._listener(Event(kind, self.name, self.done, self.total, self.unit, elapsed))

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._emit("advance")


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = "") -> Iterator[Stage]:
    """Announce stage ``name`` of ``total`` units (None: unknown) for the ``with`` block."""
    s = Stage(name, total, unit, _listener=_LISTENER.get())
    s._emit("start")
    try:
        yield s
    finally:
        s._emit("end")


@contextlib.contextmanager
def reporting(listener: Listener | None) -> Iterator[None]:
    """Send the events of stages run inside the block (in this thread) to ``listener``."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
