"""Items run in this process's threads: a bounded number in flight, the first failure raised
after the running ones finish."""

import threading
import time

import pytest

from segpipe.execution.inprocess import run_in_process


def test_run_in_process_bounds_items_in_flight_and_raises_the_first_failure():
    in_flight, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.01)
        with lock:
            in_flight[0] -= 1
        if i == 13:
            raise RuntimeError("item 13")
        return i

    done = []
    run_in_process(work, range(12), done.append, threads=3)
    assert sorted(done) == list(range(12))
    assert peak[0] <= 3
    with pytest.raises(RuntimeError, match="item 13"):
        run_in_process(work, range(40), done.append, threads=2)


@pytest.mark.parametrize(
    ("stop", "reported"), [(SystemExit(143), [0, 1, 2]), (KeyboardInterrupt(), [0, 1, 2]),
                           (RuntimeError("claim lost"), [0])],
)  # fmt: skip
def test_items_running_when_the_process_stops_are_reported_before_it_leaves(stop, reported):
    """SIGTERM's SystemExit (or Ctrl-C) raised while the first result is reported: the items
    running then finished (the pool waited) but were never reported, so a re-run computed
    them again. They are reported; nothing starts after the stop; the stop is raised. Any
    other error (a claim lost to another run) reports no more."""
    started, release = [], threading.Event()

    def work(i):
        started.append(i)
        if i > 0:
            release.wait(5)  # still running when the caller stops
        return i

    seen = []

    def on_result(i):
        seen.append(i)
        if i == 0:
            release.set()
            raise stop

    with pytest.raises(type(stop)):
        run_in_process(work, range(10), on_result, threads=3)
    assert sorted(seen) == reported and sorted(started) == [0, 1, 2]


def test_after_a_failure_no_item_starts_and_the_first_failure_is_raised(monkeypatch):
    """Item 0 fails at once; items 1 (succeeds) and 2 (fails too) finish only once the
    caller waits again, after it has seen the first failure. Nothing starts after it, the
    item that succeeded is reported, and the failure raised is item 0's, not the later one."""
    import segpipe.execution.inprocess as module

    waits, second_wait = [], threading.Event()
    real_wait = module.wait

    def counted_wait(futures, **kwargs):
        waits.append(len(futures))
        if len(waits) == 2:  # the caller has handled the first round (item 0's failure)
            second_wait.set()
        return real_wait(futures, **kwargs)

    monkeypatch.setattr(module, "wait", counted_wait)
    started = []

    def work(i):
        started.append(i)
        if i > 0:
            second_wait.wait(5)
        if i in (0, 2):
            raise RuntimeError(f"item {i}")
        return i

    seen = []
    with pytest.raises(RuntimeError, match="item 0"):
        run_in_process(work, range(10), seen.append, threads=3)
    assert sorted(started) == [0, 1, 2]
    assert seen == [1]


def test_no_more_items_are_taken_from_the_iterable_than_threads_run():
    """Items are taken from the iterable (a block's arrays, a generator's reads) only as a
    thread is free for them: with every thread held, no more than ``threads`` are taken, so
    memory stays flat however many there are. (The pool's own bound holds what runs, not
    what waits queued for it.)"""
    taken, release = [], threading.Event()

    def items():
        for i in range(50):
            taken.append(i)
            yield i

    def work(i):
        release.wait(10)
        return i

    done = []
    runner = threading.Thread(target=run_in_process, args=(work, items(), done.append),
                              kwargs={"threads": 3})  # fmt: skip
    runner.start()
    time.sleep(0.3)  # the first items are running, held
    assert len(taken) == 3
    release.set()
    runner.join(30)
    assert sorted(done) == list(range(50))
