"""The CPU's cores, shared by forward passes and the I/O threads' work.

A forward pass on the CPU runs torch's intra-op team, which meets at a barrier after every
layer: a thread that works beside it takes a core from the team, and the whole team waits for
that one thread. :class:`CoreGate` hands the cores out so that never happens.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["CoreGate"]


class CoreGate:
    """The CPU's ``cores``, taken in turn by the forward passes and by the I/O threads' work.

    A pass takes the cores its torch team runs on (:meth:`model`); an I/O section one core
    (:meth:`io`), but with no pass running or waiting any number of sections may run at once.
    A waiting pass on every core goes first, before new sections and narrower passes, so it
    waits only for what runs when it asked; a narrower pass lets sections go first (so a core
    a narrow pass leaves goes to the I/O threads' work, rather than wait until the model's
    queue runs dry and then leave a core idle; the I/O threads' own wait for the model bounds
    how long). A thread's sections may nest. Nothing that waits for the model
    (a submit into a full queue, a result) may run inside an I/O section.
    """

    def __init__(self, cores: int = 1) -> None:
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        self.cores = cores
        self._cond = threading.Condition()
        self._io = 0
        self._io_waiting = 0
        self._model = 0  # cores the running passes hold
        self._model_waiting = 0
        self._wide_waiting = 0  # of them, passes on every core
        self._depth = threading.local()

    @contextlib.contextmanager
    def io(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._cond:
                self._io_waiting += 1
                try:
                    while self._wide_waiting or (
                        (self._model or self._model_waiting)
                        and self._model + self._io >= self.cores
                    ):
                        self._cond.wait()
                except BaseException:  # an interrupted wait: passes must not wait for it
                    self._cond.notify_all()
                    raise
                finally:
                    self._io_waiting -= 1
                self._io += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                with self._cond:
                    self._io -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def model(self, cores: int | None = None) -> Iterator[None]:
        """Hold ``cores`` of the gate's (default: all of them) for one forward pass."""
        take = min(cores or self.cores, self.cores)
        wide = take == self.cores
        with self._cond:
            self._model_waiting += 1
            self._wide_waiting += wide
            try:
                while self._model + self._io + take > self.cores or (
                    not wide and (self._io_waiting or self._wide_waiting)
                ):
                    self._cond.wait()
            except BaseException:  # an interrupted wait: others must not wait for this one
                self._cond.notify_all()
                raise
            finally:
                self._model_waiting -= 1
                self._wide_waiting -= wide
            self._model += take
        try:
            yield
        finally:
            with self._cond:
                self._model -= take
                self._cond.notify_all()
