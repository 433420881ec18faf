"""Which Dask scheduler a run uses, whether it answers before the run starts, and whether
it keeps workers while the run waits on them."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import dask
import distributed

__all__ = [
    "CONNECT_TIMEOUT",
    "NO_WORKERS_WARNING_S",
    "WorkersDiedError",
    "choose_scheduler",
    "live_client",
    "reachable_scheduler",
    "workers_watched",
]

log = logging.getLogger(__name__)

# How long a client keeps trying to reach a scheduler given by address.
CONNECT_TIMEOUT = "30s"
# How long a run waits on a scheduler without workers before it says so.
NO_WORKERS_WARNING_S = 60.0


class WorkersDiedError(RuntimeError):
    """Dask gave up on a block whose workers all died running it (Dask's ``KilledWorker``:
    killed for memory, most often); the run's finished blocks are recorded, so it resumes."""


def choose_scheduler(scheduler: Any = None) -> Any:
    """The scheduler a run uses, first match wins:

    1. ``scheduler`` when given: ``"sync"``, an address, or a ``distributed.Client``;
    2. the ``distributed`` client active in this process (``distributed.get_client()``: the
       last one made here, or the worker's own inside a task);
    3. the ``scheduler-address`` of Dask's config (env ``DASK_SCHEDULER_ADDRESS``);
    4. None: a local cluster started for the run.
    """
    if scheduler is not None:
        return scheduler
    try:
        return distributed.get_client()
    except ValueError:  # no client in this process
        pass
    return dask.config.get("scheduler-address", None)


def live_client(client: distributed.Client) -> distributed.Client:
    """``client``, ConnectionError naming its scheduler when it has lost it or was closed.

    A client whose cluster died stays the process's default, reconnecting ("connecting")
    for Dask's connect timeout: a run on it would fail only then, with a bare comm error.
    """
    if client.status in ("closing", "closed"):
        raise ConnectionError(
            f"the Dask client {client.id} was closed: give an open client, or leave the "
            "scheduler unset for a local cluster"
        )
    if client.status != "running":
        address = getattr(client.scheduler, "address", None) or client.scheduler_file or "?"
        raise ConnectionError(
            f"the Dask client {client.id} has no scheduler (status {client.status!r}, its "
            f"scheduler {address}): start it again, close the client (client.close()) for a "
            "local cluster, or give another scheduler"
        )
    return client


def reachable_scheduler(scheduler: Any = None) -> Any:
    """The scheduler :func:`choose_scheduler` picks; an address is first connected to (for
    :data:`CONNECT_TIMEOUT` at most), a client checked (:func:`live_client`),
    ``ConnectionError`` naming it when that fails: a run of many images checks once, rather
    than have each image fail on it in turn."""
    address = choose_scheduler(scheduler)
    if isinstance(address, distributed.Client):
        return live_client(address)
    if isinstance(address, str) and address != "sync":
        try:
            with distributed.Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False):
                pass
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}: {exc}): "
                "start it, or leave the scheduler unset for a local cluster"
            ) from exc
    return address


@contextlib.contextmanager
def workers_watched(client: distributed.Client, output: str | os.PathLike[str]) -> Iterator[None]:
    """Warn, while the body runs, when ``client``'s scheduler has had no worker for
    :data:`NO_WORKERS_WARNING_S`: Dask waits for workers to join, without a word, for ever
    (an adaptive cluster may still be starting them, so the run goes on waiting)."""
    done, poll_s = threading.Event(), NO_WORKERS_WARNING_S / 12

    def watch() -> None:
        since, said = time.monotonic(), False
        while not done.wait(poll_s):
            try:
                workers = len(client.nthreads())
            except Exception:  # the scheduler gone: the run's own error says so
                return
            if workers:
                since, said = time.monotonic(), False
            elif not said and time.monotonic() - since >= NO_WORKERS_WARNING_S:
                log.warning(
                    "%s: the Dask scheduler %s has had no worker for %.0f s; the run waits "
                    "for workers to join (start some, or stop the run: it resumes)",
                    output,
                    client.scheduler.address,
                    time.monotonic() - since,
                )
                said = True

    watcher = threading.Thread(target=watch, name="segpipe-workers-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
