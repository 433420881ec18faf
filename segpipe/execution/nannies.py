"""The nannies of the local clusters segpipe starts, and the environment they write.

A Dask nanny puts its pre-spawn environment (malloc settings, ``OMP_NUM_THREADS=1``...) in
its own process's ``os.environ`` before it starts a worker, and a local cluster's nannies are
the process that started it: every later child of the caller's would inherit them.
:func:`environ_kept` puts the process's own back; :class:`Nanny` does it around each start of
a worker, restarts included.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator

import distributed

__all__ = ["Nanny", "environ_kept"]


@contextlib.contextmanager
def environ_kept(names: Iterable[str]) -> Iterator[None]:
    """This process's ``names`` variables as they were, once the last such block running ends.
    A nanny puts its pre-spawn environment in its own process's before it starts a worker
    (Dask's way), and a local cluster's nannies are this process: every later child of the
    caller's would start with malloc keeping freed memory and one OpenMP thread. Blocks may
    overlap (nannies start workers side by side, in any thread): the values are put back when
    none is left, so no nanny's worker starts without them."""
    global _SPAWNING
    with _SPAWN_LOCK:
        for name in names:
            _BEFORE_SPAWN.setdefault(name, os.environ.get(name))
        _SPAWNING += 1
    try:
        yield
    finally:
        with _SPAWN_LOCK:
            _SPAWNING -= 1
            if not _SPAWNING:
                for name, value in _BEFORE_SPAWN.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
                _BEFORE_SPAWN.clear()


_SPAWN_LOCK = threading.Lock()
_SPAWNING = 0  # blocks of environ_kept running
_BEFORE_SPAWN: dict[str, str | None] = {}


class Nanny(distributed.Nanny):
    """Dask's nanny, this process's environment put back once its worker is up: a nanny
    restarting a dead worker writes its pre-spawn environment here again."""

    async def instantiate(self) -> distributed.Status:
        with environ_kept(self.pre_spawn_env):
            return await super().instantiate()
