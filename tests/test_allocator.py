"""keep_freed_memory: every thread's blocks, large ones too, come from the main heap and stay
there when freed, so a forward pass reuses the pages the last one faulted in.

Checked where glibc puts a thread's blocks (``/proc/self/maps``), in fresh interpreters: the
arena setting binds only threads yet to allocate. What it does for speed is measured by
``benchmarks/throughput.py`` against ``--plain-malloc``; page faults are no test here (on
these machines the kernel reclaims idle pages on its own, so the counts vary from run to run).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="tunes glibc's malloc; reads /proc/self/maps (Linux)",
)

_WHERE = """
import ctypes, json, sys, threading
from segpipe.execution.allocator import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return [int(x, 16) for x in line.split()[0].split("-")]
    return [0, 0]

found = {}

def thread():  # not the first thread, as a pipeline's model thread is not
    for mib in (96, 8):  # over and under glibc's 32 MiB mmap threshold
        block = libc.malloc(mib << 20)
        lo, hi = heap()
        found[mib] = lo <= block < hi
        end = block + (mib << 20)
        libc.free(block)
        found[f"{mib} kept"] = heap()[1] >= end  # the heap still holds the freed block

t = threading.Thread(target=thread)
t.start()
t.join()
print(json.dumps({"kept": kept, **found}))
"""


def _run(code: str, *args: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return out.stdout.strip().splitlines()[-1]


def test_a_threads_blocks_come_from_the_main_heap_and_stay_there():
    kept = json.loads(_run(_WHERE, "keep"))
    assert kept == {"kept": True, "96": True, "96 kept": True, "8": True, "8 kept": True}
    # glibc's defaults: a block of 96 MiB is mapped on its own, a thread's 8 MiB come from
    # an arena of its own; neither is in the main heap, and the 96 MiB are unmapped when freed
    plain = json.loads(_run(_WHERE, "plain"))
    assert plain["96"] is False and plain["8"] is False, plain


@pytest.mark.parametrize(
    "setting",
    [
        "MALLOC_MMAP_MAX_=65536",
        "MALLOC_ARENA_MAX=4",
        "MALLOC_TRIM_THRESHOLD_=131072",
        "GLIBC_TUNABLES=glibc.malloc.tcache_count=0",
    ],
)
def test_a_user_who_tuned_malloc_is_left_alone(setting):
    name, value = setting.split("=", 1)
    code = "from segpipe.execution.allocator import keep_freed_memory as k; print(k(), k())"
    assert _run(code, **{name: value}) == "False False"
    assert _run(code) == "True True"


def test_a_new_process_started_with_malloc_environ_keeps_its_freed_memory():
    """A local cluster's worker processes start with it (their nanny would set a 64 KiB trim
    threshold): malloc there is tuned as keep_freed_memory tunes this process, from its start,
    and keep_freed_memory there leaves it as the environment says."""
    code = "from segpipe.execution.allocator import malloc_environ as m; print(sorted(m()))"
    names = ["MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_"]
    assert _run(code) == str(names)
    environ = json.loads(
        _run("import json; from segpipe.execution.allocator import malloc_environ as m; "
             "print(json.dumps(m()))")
    )  # fmt: skip
    started = json.loads(_run(_WHERE, "plain", **environ))
    assert started == {"kept": None, "96": True, "96 kept": True, "8": True, "8 kept": True}


@pytest.mark.parametrize(
    "setting", ["MALLOC_ARENA_MAX=4", "GLIBC_TUNABLES=glibc.malloc.tcache_count=0"]
)
def test_malloc_environ_leaves_a_users_tuning_to_the_workers(setting):
    name, value = setting.split("=", 1)
    code = "from segpipe.execution.allocator import malloc_environ as m; print(m())"
    assert _run(code, **{name: value}) == "{}"
