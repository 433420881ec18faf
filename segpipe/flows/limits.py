"""What a run of ``process-archive`` is limited by: bounds on its options, a Prefect global
concurrency limit shared by every run on the server (e.g. one slot per GPU), both checked once,
before any image (each image would otherwise fail on them with the same reason), the server
itself, and the run's stop."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator, Mapping

from segpipe.archive import RunStopped
from segpipe.flows.server_guard import guard_temporary_server

__all__ = [
    "RUN_OPTIONS",
    "SLOT_POLL_S",
    "check_run_options",
    "global_slot",
    "guard_when_temporary",
    "require_limit",
    "require_server",
    "run_stop",
    "stop_of",
]

# Open runs' stop events by key. The image tasks get the key, not the event: a task runner
# that sends tasks to other processes (prefect-dask, ProcessPoolTaskRunner) pickles their
# parameters, and an Event cannot be pickled, nor would setting it here reach them.
_STOPS: dict[str, threading.Event] = {}


@contextlib.contextmanager
def run_stop() -> Iterator[tuple[str, threading.Event]]:
    """A run's stop event, and the key :func:`stop_of` finds it by while this is open."""
    key = uuid.uuid4().hex
    _STOPS[key] = event = threading.Event()
    try:
        yield key, event
    finally:
        del _STOPS[key]


def stop_of(key: str) -> threading.Event:
    """The stop event of the run of ``key`` (:func:`run_stop`); in another process than the
    run's (an image sent to a remote worker), one never set: a stop does not reach it."""
    return _STOPS.get(key) or threading.Event()


# Seconds an image waits for a global concurrency slot before it looks whether its run stops.
SLOT_POLL_S = 5.0


@contextlib.contextmanager
def global_slot(name: str | None, stop: threading.Event) -> Iterator[None]:
    """A slot of the Prefect global concurrency limit ``name`` (shared by every run on the
    server, e.g. one per GPU), or nothing when no name is given; the wait for it ends with
    :class:`~segpipe.archive.RunStopped` once ``stop`` is set.

    Not ``strict``: the run checked that the limit exists (:func:`require_limit`), and
    strict would fail the image, after its "running" sidecar, on a limit deleted since, and
    cancel a segmentation in its middle when a lease renewal fails (an API hiccup)."""
    if not name:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with contextlib.ExitStack() as slot:
        while True:
            if stop.is_set():
                raise RunStopped
            try:
                slot.enter_context(
                    concurrency(
                        name,
                        occupy=1,
                        timeout_seconds=SLOT_POLL_S,
                        strict=False,
                        raise_on_lease_renewal_failure=False,
                    )
                )
            except TimeoutError:  # Prefect's: no slot free yet
                continue
            break
        yield


def require_limit(name: str) -> None:
    """Refuse a global concurrency limit the Prefect server does not have, before any image:
    taken leniently by each image (:func:`global_slot`), a misspelt one would limit nothing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # With no server named, each process starts a temporary one of its own: a limit
            # the runs share needs one server that they all (and `prefect gcl`) talk to.
            if not (os.environ.get("PREFECT_API_URL") or get_current_settings().api.url):
                raise ValueError(
                    f"concurrency limit {name!r}: a concurrency limit needs a running Prefect "
                    "server, and no PREFECT_API_URL names one: start it (`prefect server "
                    "start`), export PREFECT_API_URL=http://127.0.0.1:4200/api and create the "
                    f"limit there (`prefect gcl create {name} --limit 1`)"
                ) from None
            raise ValueError(
                f"concurrency limit {name!r} does not exist on the Prefect server "
                f"{client.api_url}: create it (`prefect gcl create {name} --limit 1`) or "
                "check its spelling"
            ) from None


def guard_when_temporary() -> str | None:
    """The Prefect server's URL that ``PREFECT_API_URL`` names (the environment's, else the
    profile's); where none is named, a flow call starts a temporary server, and that is
    guarded to end with this process (:mod:`segpipe.flows.server_guard`). The flow modules
    call it as they are imported, so flows called from Python are guarded as the CLI's are."""
    from prefect.settings import get_current_settings

    # The environment first: Prefect's settings hold it as it was when Prefect was imported.
    url = os.environ.get("PREFECT_API_URL") or get_current_settings().api.url
    if not url:
        guard_temporary_server()  # a kill of this process must not leave it running
    return url or None


def require_server() -> None:
    """Refuse to start a flow when the Prefect server named by ``PREFECT_API_URL`` (the
    environment's, else the profile's) does not answer: the flow's first call to it would
    fail in a page of traceback. None named: a flow call starts a temporary local server,
    which ends with this process however it ends (:mod:`segpipe.flows.server_guard`)."""
    import httpx

    url = guard_when_temporary()
    if not url:
        return
    try:  # any answer will do (Prefect Cloud's may be 401 without the key): it is up
        httpx.get(f"{url.rstrip('/')}/health", timeout=10)
    except httpx.TransportError as exc:
        raise ConnectionError(
            f"cannot reach the Prefect server at {url} ({type(exc).__name__}: {exc}): start "
            "it (`prefect server start`), or point PREFECT_API_URL at one that runs"
        ) from None


# The parameters of process-archive that check_run_options checks.
RUN_OPTIONS = (
    "max_concurrent",
    "retries",
    "retry_delay_s",
    "lock_ttl_s",
    "min_age_s",
    "concurrency_limit",
)


def check_run_options(
    *,
    max_concurrent: int,
    retries: int,
    retry_delay_s: float,
    lock_ttl_s: float,
    min_age_s: float = 0.0,
    concurrency_limit: str | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Refuse a run's bad options (the flow's parameters of these names), once: each image
    would otherwise fail on them with the same reason. A ``concurrency_limit`` must exist on
    the Prefect server (:func:`require_limit`). ``names``: what the caller calls them (the
    CLI's options)."""
    for name, value, rule, ok in (
        ("max_concurrent", max_concurrent, ">= 1", max_concurrent >= 1),
        ("retries", retries, ">= 0", retries >= 0),
        ("retry_delay_s", retry_delay_s, ">= 0 seconds", retry_delay_s >= 0),
        ("lock_ttl_s", lock_ttl_s, "> 0 seconds", lock_ttl_s > 0),
        ("min_age_s", min_age_s, ">= 0 seconds", min_age_s >= 0),
    ):
        if not ok:
            raise ValueError(f"{(names or {}).get(name, name)} must be {rule}, got {value}")
    if concurrency_limit:
        require_limit(concurrency_limit)
