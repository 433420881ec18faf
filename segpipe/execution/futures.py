"""Futures of arrays joined from futures of their parts."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError

import numpy as np

__all__ = ["concatenated"]


def concatenated(parts: Sequence[Future[np.ndarray]]) -> Future[np.ndarray]:
    """A future of the parts' results joined along their first axis, set once the last part
    is done; the first failed part's error instead (or the join's). Cancelling it cancels
    the parts not yet running. No parts: refused, as no part would ever set it."""
    if not parts:
        raise ValueError("concatenated needs at least one part")
    joined: Future[np.ndarray] = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def one_done(_: Future[np.ndarray]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        # Set here, whatever happens: a callback's exception would be logged and lost, its
        # waiter left waiting. Not where the join was cancelled (its parts may have run).
        with contextlib.suppress(InvalidStateError):
            try:
                value = np.concatenate([p.result() for p in parts], axis=0)
            except BaseException as err:
                joined.set_exception(err)
            else:
                joined.set_result(value)

    def cancel_parts(future: Future[np.ndarray]) -> None:
        if future.cancelled():
            for p in parts:
                p.cancel()

    joined.add_done_callback(cancel_parts)
    for p in parts:
        p.add_done_callback(one_done)
    return joined
