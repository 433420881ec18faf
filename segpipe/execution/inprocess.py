"""Running items in this process's threads, without Dask: how a run with
``scheduler="sync"`` (or an image too small to pay for a cluster) goes through its blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from typing import TypeVar, cast

__all__ = ["run_in_process"]

T = TypeVar("T")
R = TypeVar("R")
_END = object()


def run_in_process(
    work: Callable[[T], R],
    items: Iterable[T],
    on_result: Callable[[R], None],
    *,
    threads: int,
) -> None:
    """``on_result(work(item))`` for every item, ``threads`` items at a time, in this process.

    At most ``threads`` items are in flight (so memory stays flat however many there are);
    ``on_result`` runs in the calling thread as each finishes. After the first failure no
    item starts; those running finish and are reported (a re-run resumes from them), then
    the failure is raised. So too when the calling thread is stopped by Ctrl-C or SIGTERM's
    SystemExit: the items running finish, as the pool waits for them, and those that succeed
    are reported before it leaves (any other error of the caller's reports no more).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    todo: Iterator[T] = iter(items)
    failure: BaseException | None = None
    with ThreadPoolExecutor(threads, thread_name_prefix="segpipe-io") as pool:
        pending: set[Future[R]] = set()  # submitted, not yet handled here
        try:
            while True:
                while failure is None and len(pending) < threads:
                    item = next(todo, _END)
                    if item is _END:
                        break
                    pending.add(pool.submit(work, cast(T, item)))
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    pending.discard(fut)
                    if fut.exception() is not None:
                        failure = failure or fut.exception()
                    else:
                        on_result(fut.result())
        except (KeyboardInterrupt, SystemExit):
            # The process stopped (Ctrl-C, SIGTERM's SystemExit), still the result's writer:
            # the items running finish anyway (the pool waits for them); reported, a re-run
            # resumes from them. Other stops (a lost claim, the run's stop) report no more.
            for fut in as_completed(pending):
                if fut.exception() is None:
                    with contextlib.suppress(Exception):  # the stop is what is raised
                        on_result(fut.result())
            raise
    if failure is not None:
        raise failure
