"""What a run watches while it segments one image: its claim, the run's stop, and its
sidecar's sign of life."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

from segpipe.archive.claims import Claim

__all__ = [
    "ALIVE_INTERVAL_S",
    "CLAIM_CHECK_INTERVAL_S",
    "RunStopped",
    "names_parameter",
    "stop_when_lost",
]

# How often a run checks, as its tasks finish, that it still holds its claim: a check reads
# the lock (a GET on S3), and a task takes seconds, so this costs next to nothing.
CLAIM_CHECK_INTERVAL_S = 2.0
# How often a run's "running" sidecar records that the run is alive ("alive"): a killed run's
# retry delay counts from its last sign of life, not from its start hours before.
ALIVE_INTERVAL_S = 60.0


class RunStopped(BaseException):
    """The run was stopped (Ctrl-C, SIGTERM, a cancellation: all raised in its main thread
    only), so an image in another thread stops too. A BaseException, like KeyboardInterrupt:
    the image is recorded "interrupted", not failed."""

    def __init__(
        self, message: str = "the run was stopped (Ctrl-C, SIGTERM, a cancellation)"
    ) -> None:
        super().__init__(message)


def stop_when_lost(
    claim: Claim,
    interval_s: float,
    *,
    alive: Callable[[], object] | None = None,
    stop: threading.Event | None = None,
) -> Callable[[int, int], None]:
    """An ``on_progress`` that raises :class:`~segpipe.archive.claims.ClaimLostError` once
    ``claim`` is lost, checking at most every ``interval_s``, and :class:`RunStopped` once
    ``stop`` is set: segment then starts no more tasks
    (:func:`segpipe.execution.cluster.run_blocks`). In this process it waits for the writes in
    flight; on a distributed cluster ``client.cancel`` returns at once, and tasks
    already running still finish their block's write, which nothing records. While the claim
    holds, ``alive()`` runs at most every :data:`ALIVE_INTERVAL_S` (the sidecar's sign of
    life)."""
    last = -float("inf")
    last_alive = time.monotonic()

    def check(tiles_done: int, tiles_to_do: int) -> None:
        nonlocal last, last_alive
        if stop is not None and stop.is_set():
            raise RunStopped
        now = time.monotonic()
        if now - last >= interval_s:
            last = now
            claim.check()
        if alive is not None and now - last_alive >= ALIVE_INTERVAL_S:
            last_alive = now
            claim.check()  # only the holder writes the sidecar
            alive()

    return check


def names_parameter(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` by name (``**kwargs`` alone does not count:
    it may pass them on to something that does not take it, or sets it itself)."""
    try:
        parameter = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):  # no signature to read (some builtins, C callables)
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
