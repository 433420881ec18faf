"""Kept threads for a GPU's model lanes: a run's lanes run on threads the lanes of runs before
it ran on, one lane at a time each. cuDNN keeps its execution plans per thread: on an H200 a
window shape's first pass took 30-40 ms and its later ones 2 ms, and with a thread of its own
each run planned the 30%-tissue slide's 53-55 window shapes again (its model thread's calls
took 2.8-3.5 s a run, against 0.6-0.9 s for the all-tissue slide's two shapes)."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

__all__ = ["run_on_kept_thread"]

log = logging.getLogger(__name__)

IDLE_NAME = "segpipe-idle-lane"
_Work = tuple[Callable[[], None], str, threading.Event]
_idle: list[queue.SimpleQueue[_Work]] = []  # the inboxes of kept threads with nothing to run
_lock = threading.Lock()


def run_on_kept_thread(target: Callable[[], None], name: str) -> threading.Event:
    """Run ``target`` on a kept thread (a new one where none is idle), named ``name`` while it
    runs; the event is set once the thread is idle again, ``target`` returned or raised."""
    with _lock:
        inbox = _idle.pop() if _idle else None
    if inbox is None:
        inbox = queue.SimpleQueue()
        threading.Thread(target=_serve, args=(inbox,), name=IDLE_NAME, daemon=True).start()
    done = threading.Event()
    inbox.put((target, name, done))
    return done


def _serve(inbox: queue.SimpleQueue[_Work]) -> None:
    me = threading.current_thread()
    while True:
        target, name, done = inbox.get()
        me.name = name
        try:
            target()
        except BaseException:  # the thread lives on for the next lane; say what ended this one
            log.exception("%s failed", name)
        finally:
            del target  # not kept with the idle thread: its stage, and the model on the GPU
            me.name = IDLE_NAME
            with _lock:
                _idle.append(inbox)  # idle before the waiter hears: the next lane takes it
            done.set()


def _forget_kept_threads() -> None:
    # A forked child has none of its parent's threads: their inboxes would never be served.
    global _lock
    _idle.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_kept_threads)
