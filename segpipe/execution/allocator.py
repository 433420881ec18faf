"""How this process's C heap treats the memory a CPU forward pass frees.

glibc's malloc gives each block over 32 MiB its own fresh mapping and unmaps it when freed,
and threads other than the first allocate from arenas of 64 MiB heaps that it unmaps as they
empty. A CPU forward pass of the shipped U-Net over a 1024 px window allocates and frees about
1 GiB of activations, so every pass faults in that much fresh, zeroed memory: 1.15 million
page faults in the model thread of a sync run at 4096² (85 thousand with this module's
settings), and a pass over a 1024 px window took 598 ms instead of 385 ms on 2 cores.
:func:`keep_freed_memory` has malloc serve every block from the one main heap and keep what is
freed there for the next pass.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["KEEP_BYTES", "keep_freed_memory"]

KEEP_BYTES = (1 << 31) - 1
"""Freed bytes the heap keeps rather than returning them: 2 GiB, twice the CPU forward budget
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

    The arena setting binds only threads that have not allocated yet, so the call belongs at
    the start of a process: the ``segpipe`` command makes it first thing, a script should
    too; a CPU :class:`~segpipe.execution.predictor.Predictor` makes it as well (too late for
    threads already running). Nothing changes off glibc, or where the user tuned malloc
    (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ... or
    ``GLIBC_TUNABLES`` set: ``MALLOC_MMAP_MAX_=65536``, glibc's default, turns this off).
    """
    global _kept
    if _kept is None:
        _kept = False
        tuned_by_user = any(name in os.environ for name in _USER_SETTINGS)
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not tuned_by_user:
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
