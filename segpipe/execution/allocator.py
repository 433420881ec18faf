"""How this process's C heap treats the memory a CPU forward pass frees.

glibc's malloc gives each block over 32 MiB its own fresh mapping and unmaps it when freed,
and threads other than the first allocate from arenas of 64 MiB heaps that it unmaps as they
empty. A CPU forward pass of the shipped U-Net over a 1024 px window allocates and frees about
1 GiB of activations, so every pass faults in fresh, zeroed memory: 2.1 million page faults
in the model thread of a sync run at 4096² (1.15 million with this module's settings made
after the threads started, 85 thousand made first), and a pass over a 1024 px window took
598 ms instead of 385 ms on 2 cores.
:func:`keep_freed_memory` has malloc serve every block from the one main heap and keep what is
freed there for the next pass.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable

__all__ = ["KEEP_BYTES", "keep_freed_memory", "malloc_environ"]

KEEP_BYTES = (1 << 31) - 1
"""Freed bytes the heap keeps rather than returning them: 2 GiB, the CPU forward budget
(the most a C int, mallopt's argument, holds)."""

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
# What a user sets to tune malloc themselves; any of them leaves it as they said.
_USER_SETTINGS = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)
_TOP_PAD = 256 << 20
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for CPU inference in this process, once; returns whether it is.

    One arena for every thread (``M_ARENA_MAX`` 1), no block mapped on its own
    (``M_MMAP_MAX`` 0), the heap grown 256 MiB beyond each need (``M_TOP_PAD``: with 80 MiB
    blocks it stopped faulting within four passes in three runs of three, one of three
    without), and up to :data:`KEEP_BYTES` of freed memory kept (``M_TRIM_THRESHOLD``).
    Passes then reuse their pages: ``benchmarks/throughput.py`` at 4096² on 2 cores (fastest
    of three) gave the bare forward 7.0 s instead of 10.5 s and a sync run 10.0 s instead of
    13.6 s. The price: the process holds its peak heap until it exits.

    The arena setting keeps new threads off new arenas; threads that already allocated keep
    theirs, and glibc may hand a new thread an arena one of them left. So the call belongs at
    the start of a process: the ``segpipe`` commands that run models make it first thing, a
    script should too; a CPU :class:`~segpipe.execution.predictor.Predictor` makes it as
    well, late (in a sync run at 4096² its model thread then still took 1.15 million page
    faults). On a GPU run it changes little: the activations live on the device.

    Nothing changes off glibc, or where malloc was tuned in the environment
    (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or any ``GLIBC_TUNABLES``):
    ``MALLOC_MMAP_MAX_=65536``, glibc's default, turns this off. A Dask nanny starts its
    workers with ``MALLOC_TRIM_THRESHOLD_`` set (distributed's ``pre-spawn-environ``), so in
    the worker processes of a ``dask worker`` cluster this does nothing; a local cluster's
    start with :func:`malloc_environ` instead.
    """
    global _kept
    if _kept is None:
        _kept = False
        if _tunable():
            mallopt = ctypes.CDLL(None).mallopt
            _kept = all(
                mallopt(param, value)
                for param, value in (
                    (_M_ARENA_MAX, 1),
                    (_M_TRIM_THRESHOLD, KEEP_BYTES),
                    (_M_TOP_PAD, _TOP_PAD),
                    (_M_MMAP_MAX, 0),
                )
            )
    return _kept


def malloc_environ(tuned: Iterable[str] = ()) -> dict[str, str]:
    """The environment that has glibc's malloc in a new process keep freed memory from its
    start, as :func:`keep_freed_memory` has it in this one: for worker processes (a local
    cluster's, whose nannies would otherwise set ``MALLOC_TRIM_THRESHOLD_`` to 64 KiB). Empty
    off glibc, or where malloc was tuned in this environment (the workers inherit that) or by
    one of the variables named in ``tuned`` (a user's, in Dask's pre-spawn environment).

    In a local cluster of two worker processes on 2 cores, a null model's run at 4096² took
    0.96-1.09 s with it and 1.6-1.8 s without, 1.7-1.9 CPU s against 3.0-3.2 (the fresh
    pages of each block's arrays faulted in)."""
    if not _tunable() or any(name in _USER_SETTINGS for name in tuned):
        return {}
    return {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TOP_PAD_": str(_TOP_PAD),
        "MALLOC_TRIM_THRESHOLD_": str(KEEP_BYTES),
    }


def _tunable() -> bool:
    tuned_by_user = any(name in os.environ for name in _USER_SETTINGS)
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not tuned_by_user
