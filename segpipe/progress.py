"""Progress of a run's stages (ingest, tissue mask, segment, pyramid), told to one listener.

Library code announces stages and advances them; it never prints. Whoever drives a run (the
CLI, a flow) installs a listener with :func:`reporting` that turns events into terminal bars
(:class:`TerminalBars`), plain lines (:class:`PlainLines`) or Prefect artifacts
(``segpipe.flows.progress``). With no listener, stages cost a context-variable lookup.

>>> events = []
>>> with reporting(events.append):
...     with stage("pyramid", total=2, unit="level") as s:
...         s.advance()
...         s.advance()
>>> [(e.kind, e.done) for e in events]
[('start', 0), ('advance', 1), ('advance', 2), ('end', 2)]

A listener is called in the thread that advances the stage (the driver: Dask results arrive
there), possibly from several threads at once (an archive run's concurrent images), so the
listeners here take a lock. A listener must not raise: a progress display never fails a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TextIO, TypeVar

__all__ = [
    "Event",
    "Listener",
    "PlainLines",
    "Stage",
    "TerminalBars",
    "also_reporting",
    "console",
    "describe",
    "progress_option",
    "reporting",
    "showing",
    "stage",
]

EventKind = Literal["start", "advance", "end"]


@dataclass(frozen=True)
class Event:
    """One change of a stage: started, advanced to ``done`` of ``total`` units, or ended.

    ``ok`` is False on the ``end`` of a stage left by an exception; ``stage_id`` tells apart
    two stages of the same name running at once; ``note`` is the stage's latest remark
    (``"loss 0.1234"``)."""

    kind: EventKind
    stage: str
    done: int
    total: int | None
    unit: str
    elapsed_s: float
    ok: bool = True
    stage_id: int = 0
    note: str = ""


Listener = Callable[[Event], None]

_LISTENER: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "segpipe_progress_listener", default=None
)
_STAGE_IDS = itertools.count(1)


@dataclass
class Stage:
    """A running stage; :meth:`advance` as units of work finish, ``note`` for a remark."""

    name: str
    total: int | None
    unit: str
    done: int = 0
    note: str = ""
    _listener: Listener | None = None
    _started: float = field(default_factory=time.perf_counter)
    _id: int = field(default_factory=lambda: next(_STAGE_IDS))

    def _emit(self, kind: EventKind, *, ok: bool = True) -> None:
        if self._listener is not None:
            elapsed = time.perf_counter() - self._started
            self._listener(
                Event(
                    kind,
                    self.name,
                    self.done,
                    self.total,
                    self.unit,
                    elapsed,
                    ok=ok,
                    stage_id=self._id,
                    note=self.note,
                )
            )

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
    except BaseException:
        s._emit("end", ok=False)
        raise
    s._emit("end")


@contextlib.contextmanager
def reporting(listener: Listener | None) -> Iterator[None]:
    """Send the events of stages run inside the block to ``listener``: in this thread, and in
    threads started with a copy of its context (Prefect's task runners copy it)."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


@contextlib.contextmanager
def also_reporting(listener: Listener) -> Iterator[None]:
    """Like :func:`reporting`, keeping the listener installed already (a flow's artifacts
    beside the CLI's terminal bars)."""
    outer = _LISTENER.get()
    if outer is None:
        with reporting(listener):
            yield
        return

    def both(event: Event) -> None:
        outer(event)
        listener(event)

    with reporting(both):
        yield


@contextlib.contextmanager
def showing(progress: bool, stream: TextIO | None = None) -> Iterator[None]:
    """What a public function's ``progress=True`` means: stages inside the block are shown on
    ``stream`` (default stderr, :func:`console`) unless a listener is installed already (a
    CLI's, a flow's), which keeps them. ``progress=False`` installs nothing."""
    if progress and _LISTENER.get() is None:
        with reporting(console(stream)):
            yield
    else:
        yield


P = ParamSpec("P")
R = TypeVar("R")


def progress_option(fn: Callable[P, R]) -> Callable[P, R]:
    """Give a function's keyword ``progress: bool`` the meaning of :func:`showing`."""

    @functools.wraps(fn)
    def with_progress(*args: P.args, **kwargs: P.kwargs) -> R:
        with showing(bool(kwargs.get("progress", False))):
            return fn(*args, **kwargs)

    return with_progress


def console(stream: TextIO | None = None) -> Listener:
    """The listener for a person watching ``stream`` (default stderr): one bar per stage on a
    terminal (:class:`TerminalBars`), plain periodic lines anywhere else (:class:`PlainLines`:
    a log file, a CI job, a pipe)."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return TerminalBars(stream) if callable(isatty) and isatty() else PlainLines(stream)


def _plural(unit: str, n: int | None) -> str:
    return unit if not unit or n == 1 or unit.endswith("s") else unit + "s"


def describe(event: Event) -> str:
    """One line for a person: ``segment: 12/40 tiles (30%) 4.1 s, about 9.6 s left``.

    >>> describe(Event("advance", "segment", 12, 40, "tile", 4.1))
    'segment: 12/40 tiles (30%) 4.1 s, about 9.6 s left'
    >>> describe(Event("end", "ingest", 3, 3, "level", 0.52))
    'ingest: 3/3 levels (100%) 0.5 s, done'
    >>> describe(Event("end", "train", 7, None, "step", 2.0, ok=False))
    'train: 7 steps 2.0 s, stopped'
    """
    if event.total is None:
        text = f"{event.stage}: {event.done} {_plural(event.unit, event.done)}"
    else:
        percent = 100 * event.done // event.total if event.total else 100
        unit = _plural(event.unit, event.total)
        text = f"{event.stage}: {event.done}/{event.total}{' ' if unit else ''}{unit} ({percent}%)"
    text += f" {event.elapsed_s:.1f} s"
    if event.kind == "end":
        text += ", done" if event.ok else ", stopped"
    elif event.kind == "advance" and event.total and 0 < event.done < event.total:
        left = event.elapsed_s * (event.total - event.done) / event.done
        text += f", about {left:.1f} s left"
    return f"{text}, {event.note}" if event.note else text


class PlainLines:
    """Listener writing one line per stage event (:func:`describe`) at its start and end, and
    between them at most one every ``every_s`` seconds of ``clock``: readable in a log file,
    where a bar's carriage returns make one endless line."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self._clock = clock
        self._last: dict[int, tuple[float, int]] = {}  # stage id -> (time, done) of its line
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            now = self._clock()
            if event.kind == "advance":
                last_time, last_done = self._last.get(event.stage_id, (now, -1))
                if now - last_time < self.every_s or event.done == last_done:
                    return
            if event.kind == "end":
                self._last.pop(event.stage_id, None)
            else:
                self._last[event.stage_id] = (now, event.done)
            # Not print(): a Prefect flow with log_prints would turn the line into a log record.
            self.stream.write(describe(event) + "\n")
            self.stream.flush()


class TerminalBars:
    """Listener drawing one labelled tqdm bar per running stage on a terminal; several at
    once (an archive run's images) stack."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._bars: dict[int, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        from tqdm.auto import tqdm

        with self._lock:
            if event.kind == "start":
                self._bars[event.stage_id] = tqdm(
                    total=event.total,
                    desc=event.stage,
                    unit=event.unit or "it",
                    file=self.stream,
                    dynamic_ncols=True,
                    leave=True,
                )
                return
            bar = self._bars.get(event.stage_id)
            if bar is None:  # started before this listener was installed
                return
            bar.update(event.done - bar.n)
            if event.note:
                bar.set_postfix_str(event.note, refresh=False)
            if event.kind == "end":
                if not event.ok:
                    bar.set_postfix_str("stopped", refresh=False)
                bar.close()
                del self._bars[event.stage_id]
