"""Prefect's temporary API server, made to end with the process that started it.

With no ``PREFECT_API_URL``, Prefect 3 serves its API from a child process (uvicorn) for the
run, and stops it as the run exits. A run killed outright (SIGKILL, the OOM killer) cannot stop
it: the server lived on, 200 MB, holding the command's stdout and stderr open, so ``| tee`` or
a cron wrapper reading them waited for ever. :func:`guard_temporary_server` has Prefect start
that child through :func:`main` instead: its stdout goes nowhere (Prefect logs its own side),
its errors to the command's stderr, and a thread ends it once its parent is gone. A thread,
not ``PR_SET_PDEATHSIG``: that fires when the *thread* that started the child ends, which may
be a task's.

This module imports nothing heavy: the child runs it before uvicorn.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import runpy
import subprocess
import sys
import threading
import time
import types
from typing import Any

__all__ = ["guard_temporary_server", "main"]

# Seconds between the child's looks at its parent.
_POLL_S = 0.5


_SERVER = "prefect.server.api.server"


def guard_temporary_server() -> None:
    """Start Prefect's temporary server (if it starts one) through :func:`main`; idempotent.

    Prefect's server module (3-4 s and 85 MB to import) is patched as it is imported, or at
    once where it is already: a process that never starts the server never imports it."""
    if _SERVER in sys.modules:
        _patch(sys.modules[_SERVER])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def _patch(server: types.ModuleType) -> None:
    # Prefect 3's server module starts uvicorn with its own `subprocess.Popen`; a release that
    # starts it otherwise is left as it is (unguarded, as before), not broken.
    if getattr(server, "subprocess", None) is subprocess:
        server.subprocess = _GuardedSubprocess()  # type: ignore[attr-defined]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds Prefect's server module as the other finders do, and patches it once loaded."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _SERVER:
            return None
        sys.meta_path.remove(self)  # once: the other finders find the module itself
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: types.ModuleType) -> None:
                load(module)
                _patch(module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


class _GuardedSubprocess(types.ModuleType):
    """``subprocess`` as Prefect's server module sees it, but for one call: Popen of uvicorn."""

    def __init__(self) -> None:
        super().__init__("subprocess")

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        if list(args[1:3]) == ["-m", "uvicorn"]:
            args = [args[0], "-m", __name__, str(os.getpid()), *args[3:]]
            # Its errors (a database it cannot open) stay on stderr: it ends within _POLL_S
            # of its parent, so it holds the stream no longer than that.
            devnull = subprocess.DEVNULL
            kwargs = {**kwargs, "stdin": devnull, "stdout": devnull}
        return subprocess.Popen(args, **kwargs)


def main() -> None:
    """``python -m segpipe.flows.server_guard PARENT_PID UVICORN_ARGS...``: uvicorn, ended
    (exit 0) as soon as process ``PARENT_PID`` is no longer its parent."""
    parent, sys.argv = int(sys.argv[1]), ["uvicorn", *sys.argv[2:]]

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_POLL_S)
        os._exit(0)  # the server's own shutdown would wait on its clients

    threading.Thread(target=watch, name="segpipe-parent-watch", daemon=True).start()
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
