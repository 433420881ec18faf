"""Which failures of an image's task Prefect retries: the transient ones only.

Bad input never heals, and a model that fails on a window, or gives NaN there, fails there
again: retried, a gigapixel slide was computed three times (``deploy/prefect.yaml``: two
retries) before it was reported. I/O hiccups, lost workers and a device out of memory (other
jobs on the GPU) may pass.
"""

from __future__ import annotations

import errno
from typing import Any

from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from segpipe.archive.claims import ClaimLostError
from segpipe.execution.predictor import is_out_of_memory
from segpipe.execution.stitching import PredictionError
from segpipe.io.readers import ImageReadError
from segpipe.results.tiles import ResultReplacedError

__all__ = ["PERMANENT_ERRORS", "is_transient"]

# Errors that another attempt cannot fix: retrying a corrupt file only delays the report.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ImageReadError,
    ValueError,
    TypeError,
    FileExistsError,
    FileNotFoundError,
    ClaimLostError,
    PredictionError,
    # Another run replaced the result this one was writing (an overwrite): this run stops,
    # and another attempt would only fight that run over its result.
    ResultReplacedError,
)


# A reader's error that a network share or object store may not raise again (the readers wrap
# every OSError of a read in an ImageReadError, as they do bad bytes).
# s3fs gives an object store's SlowDown / 503 as EBUSY, its InternalError / 500 as EREMOTEIO.
_PASSING_IO = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                         errno.EAGAIN, errno.ESTALE, errno.ENETDOWN, errno.ENETUNREACH,
                         errno.EHOSTUNREACH, errno.EBUSY,
                         getattr(errno, "EREMOTEIO", errno.EIO)})  # fmt: skip


def is_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is one of
    :data:`PERMANENT_ERRORS`, a model's failure out of memory and a read's I/O error or
    memory shortage that may pass (EIO, a timeout, a reset connection) excepted."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, ImageReadError) and (cause := error.__cause__) is not None:
        if isinstance(cause, ConnectionError | TimeoutError):
            return True
        if isinstance(cause, OSError) and cause.errno in _PASSING_IO:
            return True
        # Memory short now, beside other images; a damaged chunk's claim of 2**50 bytes
        # fails again at once, costing no more than its report's delay.
        if isinstance(cause, MemoryError):
            return True
    # A device out of memory, which another attempt (beside other work) may not be.
    if isinstance(error, PredictionError) and is_out_of_memory(error.__cause__):
        return True
    return not isinstance(error, PERMANENT_ERRORS)
