"""Running items in this process's threads, without Dask: how a run with
``scheduler="sync"`` (or an image too small to pay for a cluster) goes through its blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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
    the failure is raised.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    todo: Iterator[T] = iter(items)
    failure: BaseException | None = None
    with ThreadPoolExecutor(threads, thread_name_prefix="segpipe-io") as pool:
        running: set[Future[R]] = set()
        while True:
            while failure is None and len(running) < threads:
                item = next(todo, _END)
                if item is _END:
                    break
                running.add(pool.submit(work, cast(T, item)))
            if not running:
                break
            finished, running = _wait_one(running)
            for fut in finished:
                if fut.exception() is not None:
                    failure = failure or fut.exception()
                else:
                    on_result(fut.result())
    if failure is not None:
        raise failure


def _wait_one(running: set[Future[R]]) -> tuple[set[Future[R]], set[Future[R]]]:
    done, not_done = wait(running, return_when=FIRST_COMPLETED)
    return set(done), set(not_done)
