"""File handles that threads read through: opened under a lock, closed under no read, left
out when pickled.

A reader's handles (a ``TiffFile``, a wsidicom or OpenSlide slide, the fsspec file of a URL)
are opened under the reader's lock but read outside it, so that threads decode at once.
Closing one under a read fails the read as if the file were damaged (or, in OpenSlide, frees
memory under it). So each read is counted on the handles it reads through: those opened since
the last close, a *generation*. :meth:`SharedHandles.close` closes a generation no read is in
at once, and leaves one that reads are in to the last of them to close; reads that start
after the close open handles of a new generation, which that close does not touch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["SharedHandles"]

T = TypeVar("T")


class _Generation:
    """Reads in flight through one generation of handles, and the handles a close left to
    the last of them (empty while the generation is the current one)."""

    def __init__(self) -> None:
        self.reads = 0
        self.to_close: list[Any] = []


class SharedHandles:
    """Handles shared by threads, for a reader to inherit.

    A subclass names its handle attributes, each with its value when closed, in
    ``_handle_state()``; opens them under ``_lock`` (inside ``_reading``, for a read); keeps
    other files it opens (a URL's fsspec file) in ``_files``; and reads through a handle
    only inside ``_reading``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = _Generation()
        self._files: list[Any] = []

    def _handle_state(self) -> dict[str, Any]:
        """The subclass's handles and caches of them, each with its value when closed
        (None): replaced when pickling and on :meth:`close`, which closes those with a
        ``close`` method."""
        return {}

    def close(self) -> None:
        """Close open file handles (those a read is in as the last such read ends); they
        are opened again on next use."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        """:meth:`close`, the caller holding the lock."""
        # Taken out at once, so that reads from now on open handles of their own.
        closed = self._handle_state()
        handles = [getattr(self, name) for name in closed] + self._files
        self.__dict__.update(closed)
        self._files = []
        handles = [h for h in handles if hasattr(h, "close")]
        if self._generation.reads:
            self._generation.to_close = handles
            self._generation = _Generation()
        else:
            _close_all(handles)

    @contextmanager
    def _reading(self, open_handle: Callable[[], T]) -> Iterator[T]:
        """``open_handle()`` (called under the lock: a handle, opened if closed), counted
        as read until the block ends, and closed then if a close came meanwhile."""
        with self._lock:
            handle = open_handle()
            generation = self._generation
            generation.reads += 1
        try:
            yield handle
        finally:
            with self._lock:
                generation.reads -= 1
                if not generation.reads:
                    _close_all(generation.to_close)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"], state["_generation"]
        state["_files"] = []
        state.update(self._handle_state())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._generation = _Generation()
        # A copy (a Dask worker's): nobody else holds it, so its user closes it when done;
        # the original is its opener's to close.
        self.unpickled = True


def _close_all(handles: list[Any]) -> None:
    for handle in handles:  # in the order taken: a TiffFile before the file it reads
        handle.close()
    handles.clear()
