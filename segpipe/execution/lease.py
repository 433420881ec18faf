"""A run's writes in one process: what its end waits for, and refuses after.

Dask cannot stop a task that is running when its run fails: left alone it would go on writing,
maybe into the result a new run has made at the same path since. A run's tasks write under its
:class:`Lease` (one per run per process, :mod:`segpipe.execution.tasks`); the run's end waits
for the writes in flight and refuses the later ones (:class:`RunEnded`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["Lease", "RunEnded"]


class RunEnded(RuntimeError):
    """The task's run has ended in this process (done, failed or cancelled): it writes no more."""


class Lease:
    """Run ``key``'s writes in this process: :meth:`writing` around each, :meth:`end` once."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._changed = threading.Condition()
        self._writing = 0
        self._ended = False

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """One write; raises :class:`RunEnded` once the run has ended."""
        with self._changed:
            if self._ended:
                raise RunEnded(
                    f"run {self.key} has ended in this process (pid {os.getpid()}): its "
                    "tasks write nothing more"
                )
            self._writing += 1
        try:
            yield
        finally:
            with self._changed:
                self._writing -= 1
                self._changed.notify_all()

    def end(self) -> None:
        """Wait for the writes in flight; refuse later ones."""
        with self._changed:
            self._ended = True
            while self._writing:
                self._changed.wait()
