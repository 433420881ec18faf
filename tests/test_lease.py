"""A run's writes in one process (segpipe.execution.lease): its end waits for the writes in
flight and refuses the later ones."""

import threading
import time

import pytest

from segpipe.execution.lease import Lease, RunEnded

# How long a thread that must stay blocked is given to return all the same: a negative
# check, so it costs its whole length on the code as it should be, and never synchronises.
STILL_BLOCKED_S = 0.2


def wait_until_ended(lease: Lease) -> None:
    """Return once ``lease.end()`` has begun, as a write started now would see it (refused)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with lease.writing():
                pass
        except RunEnded:
            return
        time.sleep(0.001)  # polling a public signal, not waiting for a thread's progress
    pytest.fail("end() was called, yet a write started 5 s later was not refused")


def ending(lease: Lease, log: list[str]) -> threading.Thread:
    """A thread running ``lease.end()``, logging when it returns; started."""

    def end() -> None:
        lease.end()
        log.append("end returned")

    thread = threading.Thread(target=end, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("writes", [1, 3])
def test_ending_a_lease_waits_for_every_write_in_flight(writes):
    lease, log = Lease("run-a"), []
    entered = [threading.Event() for _ in range(writes)]
    release = [threading.Event() for _ in range(writes)]

    def write(i: int) -> None:
        with lease.writing():
            entered[i].set()
            release[i].wait(5)
            log.append(f"write {i} done")

    writers = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(writes)]
    for w, e in zip(writers, entered, strict=True):
        w.start()
        assert e.wait(5)
    ender = ending(lease, log)
    wait_until_ended(lease)
    for i in range(writes - 1):  # all writes but the last done: end() still waits
        release[i].set()
        writers[i].join(5)
    ender.join(STILL_BLOCKED_S)
    assert ender.is_alive(), f"end() returned with a write in flight: {log}"
    release[-1].set()
    ender.join(5)
    assert not ender.is_alive()
    assert log == [*(f"write {i} done" for i in range(writes)), "end returned"]


def test_a_write_started_after_the_end_is_refused_naming_the_run():
    lease, ran = Lease("run-b"), []
    with lease.writing():
        ran.append("before")
    lease.end()
    for _ in range(2):  # and stays refused
        with pytest.raises(RunEnded, match="run run-b has ended in this process"), lease.writing():
            ran.append("after")
    assert ran == ["before"]
    lease.end()  # a second end (remove_predictor after a failed run's) returns at once


def test_a_write_that_fails_still_lets_the_end_return():
    lease, log = Lease("run-c"), []
    with pytest.raises(ValueError, match="disk full"), lease.writing():
        raise ValueError("disk full")
    ender = ending(lease, log)
    ender.join(5)
    assert log == ["end returned"]
