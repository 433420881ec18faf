"""Kept threads for a GPU's model lanes (execution.lanes)."""

import os
import threading

from segpipe.execution import lanes


def test_lanes_run_one_after_another_on_one_kept_thread_named_while_they_run():
    seen = []

    def lane():
        seen.append((threading.get_native_id(), threading.current_thread().name))

    for _ in range(3):
        lanes.run_on_kept_thread(lane, "segpipe-model").wait(10)
    assert len({tid for tid, _ in seen}) == 1 and {name for _, name in seen} == {"segpipe-model"}
    idle = [t for t in threading.enumerate() if t.native_id == seen[0][0]]
    assert [t.name for t in idle] == [lanes.IDLE_NAME]


def test_a_kept_thread_lives_on_after_its_lane_fails_and_a_forked_child_starts_its_own():
    """A lane's loop that raises leaves its kept thread to the next lane; a child forked
    from a process with kept threads (none of which it has) starts a thread of its own."""

    def boom():
        raise RuntimeError("lane failed")

    first = threading.Event()
    lanes.run_on_kept_thread(boom, "segpipe-model").wait(10)
    lanes.run_on_kept_thread(first.set, "segpipe-model").wait(10)
    assert first.is_set()
    pid = os.fork()
    if pid == 0:  # the child: exits 0 only if its lane runs
        ran = threading.Event()
        lanes.run_on_kept_thread(ran.set, "segpipe-model").wait(10)
        os._exit(0 if ran.is_set() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
