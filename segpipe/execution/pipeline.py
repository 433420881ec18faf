"""The pipelined worker: I/O threads feed the model threads through bounded queues.

One :class:`ModelStage` per model per process (per GPU: one worker process each). The threads
that run tasks (Dask's worker threads, or
:func:`~segpipe.execution.inprocess.run_in_process`'s) are the I/O threads: each
reads, decodes, mirrors and normalises its block's windows, hands them to the stage, and
stitches, encodes and writes what comes back, while the stage's model thread keeps the device
busy with batches that may mix windows of several blocks::

    I/O thread 1: read+prepare A --submit--> ...wait... <--probabilities-- stitch+write A
    I/O thread 2:            read+prepare B --submit--> ...wait...         <-- stitch+write B
    model thread:                    [ batch: A0 A1 B0 B1 ][ batch: B2 ... ]

Memory stays flat: at most ``io_threads`` blocks are in flight (their input and sink), each of the
two queues (wide and narrow passes) holds at most ``max_queued`` batches' worth of prepared
windows, and a submitter blocks while its queue is full. On a GPU the model thread only launches
kernels and copies, so the device never waits for a read. On a CPU a wide pass runs torch's
intra-op team on every core, and the I/O threads take only what it leaves: their CPU work runs in
:meth:`ModelStage.io_section`, which a wide pass never overlaps (:class:`CoreGate`). Beside a pass,
an I/O thread does not use a spare core, there is none: it takes one of the team's, and the whole
team waits at its next barrier for the thread it lost (at 4096² the shipped model's passes took
13.6 s beside the I/O threads, 9.5 s with them held off). Windows small enough for the memory
budget run narrow instead: one pass per core, side by side, each on one torch thread (no team, no
barrier), and an I/O section may take the core a narrow pass leaves free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from segpipe.execution.futures import concatenated
from segpipe.execution.gate import CoreGate
from segpipe.execution.lanes import run_on_kept_thread
from segpipe.execution.predictor import PendingProbabilities, Predictor, is_out_of_memory

__all__ = ["ModelStage", "PassPlan", "StageClosed", "StageStats"]


@dataclass
class StageStats:
    """What a stage has done: for tests (the queue bound) and benchmarks (busy fraction)."""

    batches: int = 0
    windows: int = 0
    busy_seconds: float = 0.0  # in forward calls, summed over model threads (GPU: + launching)
    peak_queued: int = 0  # chunks waiting at once in one queue, at most ``max_queued``


class StageClosed(RuntimeError):
    """The stage was closed (its run ended): it takes no more windows."""


@dataclass(frozen=True)
class PassPlan:
    """How windows of one shape run: up to ``limit`` per forward pass, on ``threads`` of
    torch's; ``narrow`` passes run side by side in the narrow lanes, wide ones alone."""

    limit: int
    threads: int
    narrow: bool = False
    joins: bool = False  # whether a pass takes windows of other submits queued behind


@dataclass
class _Chunk:
    windows: np.ndarray  # prepared (n, Y, X, C): uint8, or float32 scaled; n <= plan.limit
    plan: PassPlan
    future: Future[np.ndarray]


_STOP = object()


class ModelStage:
    """Runs ``predictor`` on its model threads over windows that any thread submits.

    Parameters
    ----------
    predictor
        The process's model on its device.
    max_batch
        Windows per wide forward pass at most (default ``predictor.config.batch_size``),
        fewer where the windows are large for the device's memory
        (``predictor.memory_budget``); off the CPU a batch takes what is queued, so it may
        join windows of several blocks (on the CPU, one submit's: equal bits in every run).
        Narrow passes take one window.
    max_queued
        Chunks (of up to ``max_batch`` windows) waiting at once; ``submit`` blocks beyond it.
    share_cores
        Whether forward passes and I/O sections take the cores in turn (:class:`CoreGate`);
        default: when the model runs on the CPU.
    lanes
        Model threads. Default: one per torch thread when the stage shares the cores; always
        one when it does not. Windows small enough that ``lanes`` passes fit the memory budget
        together run narrow: several passes side by side, ``threads // lanes`` torch threads
        each (a team meets at a barrier after every layer, and small layers keep it waiting; on
        2 cores, two one-thread passes side by side did the work of two-thread passes over 256
        px windows in 0.65-0.75 of the time at a busy hour, 0.9-0.95 on a quiet machine), and
        an I/O section may take a core a narrow pass leaves. Larger windows run wide: one pass
        at a time on every thread.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int | None = None,
        max_queued: int = 2,
        share_cores: bool | None = None,
        lanes: int | None = None,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1 chunk, got {max_queued}")
        if lanes is not None and lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.predictor = predictor
        self.max_batch = max_batch or predictor.config.batch_size
        self.max_queued = max_queued
        self.stats = StageStats()
        # Wide passes have one thread of their own: OpenMP keeps a team of workers for each
        # thread that starts parallel regions (taken by either of two threads, wide passes
        # ran the all-tissue slide at 8192² in 72-75 s against 63-70 s).
        self._queues: dict[bool, queue.Queue[object]] = {
            narrow: queue.Queue(maxsize=max_queued) for narrow in (False, True)
        }
        self._lock = threading.Lock()
        self._lanes: dict[bool, list[Callable[[], object]]] = {False: [], True: []}  # ends
        self._plans: dict[tuple[int, ...], PassPlan] = {}
        self._closed = False
        self._submitting = 0  # submitters between their check and their last put
        self._idle = threading.Condition(self._lock)
        self._found = _process_torch_threads(predictor)  # given back by close()
        self._torch_threads = predictor.config.threads or self._found
        with _OPEN_LOCK:
            _OPEN_STAGES.add(self)
        if share_cores is None:
            share_cores = predictor.device.type == "cpu"
        self.gate = CoreGate(self._torch_threads) if share_cores else None
        # Narrow passes change torch's thread count, which other threads see too (with this
        # build's OpenMP a count set in one thread showed in the others): only under the gate,
        # so without it (a GPU's stage) one lane.
        self.lanes = (lanes or self._torch_threads) if share_cores else 1

    def io_section(self) -> contextlib.AbstractContextManager[None]:
        """Where an I/O thread does CPU work (read, decode, prepare, stitch, encode, write):
        never beside a forward pass when the stage shares the cores (see the module doc)."""
        return self.gate.io() if self.gate is not None else contextlib.nullcontext()

    def queued(self) -> int:
        """Chunks waiting now (at most ``max_queued`` of wide passes and as many narrow)."""
        return sum(q.qsize() for q in self._queues.values())

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """(N, Y, X, C) pixels -> (N, classes, y, x) probabilities: a ``WindowPredictor``."""
        return self.submit(windows).result()

    def submit(self, windows: np.ndarray) -> Future[np.ndarray]:
        """Queue ``windows`` (prepared here, in the caller's thread); the future gives their
        probabilities. Blocks while the queue is full."""
        if not len(windows):  # no chunk would ever complete the future
            raise ValueError(f"submit needs at least one window, got shape {windows.shape}")
        with self.io_section():
            prepared = self.predictor.prepare(windows)
        plan = self.pass_plan(prepared.shape[1:])
        step = plan.limit
        parts = [
            _Chunk(prepared[i : i + step], plan, Future()) for i in range(0, len(prepared), step)
        ]
        todo = self._queues[plan.narrow]
        with self._lock:
            if self._closed:
                raise StageClosed("the model stage is closed: its run has ended")
            self._start(plan.narrow)
            self._submitting += 1
        try:  # close() waits for this: no chunk is queued behind its stops
            for part in parts:
                todo.put(part)
                with self._lock:
                    self.stats.peak_queued = max(self.stats.peak_queued, todo.qsize())
        finally:
            with self._lock:
                self._submitting -= 1
                self._idle.notify_all()
        if len(parts) == 1:
            return parts[0].future
        return concatenated([p.future for p in parts])

    def pass_plan(self, window_shape: tuple[int, ...]) -> PassPlan:
        """How windows of ``window_shape`` (Y, X, C) run: narrow, one window a pass, when
        ``lanes`` such passes fit the memory budget together; else wide, alone, as many
        windows as ``max_batch`` and the whole budget allow."""
        plan = self._plans.get(window_shape)
        if plan is None:
            ny, nx, channels = window_shape
            one = ny * nx * self.predictor.bytes_per_pixel(channels)
            budget = self.predictor.memory_budget()
            if self.lanes > 1 and one * self.lanes <= budget:
                # One window a pass: the lanes are the parallelism, and a pass's activations
                # stay small (on 2 cores, 256 px and 128 px windows of a width-16 U-Net ran
                # 10-15% faster one at a time than in fours).
                plan = PassPlan(1, max(1, self._torch_threads // self.lanes), narrow=True)
            else:
                limit = max(1, min(self.max_batch, int(budget // one)))
                # Not on the CPU: the windows queued behind a pass, of other blocks, differ
                # from run to run, and a batch's size changes the last bits of each window's
                # sums (an 8-core run's three runs gave three results, 6e-8 apart). A pass of
                # one submit's windows is the same pass in every run.
                plan = PassPlan(limit, self._torch_threads, joins=self.gate is None)
            self._plans[window_shape] = plan
        return plan

    def close(self) -> None:
        """Stop the model threads once the queued windows are done; later submits raise
        :class:`StageClosed` (a task of a run that ended must not start the threads again)."""
        with self._lock:
            self._closed = True
            while self._submitting:  # their puts go before the stops
                self._idle.wait()
            lanes, self._lanes = self._lanes, {False: [], True: []}
        for narrow, started in lanes.items():
            for _ in started:
                self._queues[narrow].put(_STOP)
        for join in lanes[False] + lanes[True]:
            join()
        if lanes[True] or self._torch_threads != self._found:
            torch.set_num_threads(self._found)
        with _OPEN_LOCK:
            _OPEN_STAGES.discard(self)

    def _start(self, narrow: bool) -> None:
        # Under self._lock. A CPU's lanes keep threads of their own: each thread that starts
        # parallel regions keeps an OpenMP team, and kept threads were measured on a GPU only.
        if not self._lanes[narrow]:
            names = (
                [f"segpipe-model-{i}" for i in range(self.lanes)] if narrow else ["segpipe-model"]
            )
            if self.gate is None:  # a GPU's lane, on a kept thread: its cuDNN plans kept
                run = functools.partial(self._run, narrow)
                self._lanes[narrow] = [run_on_kept_thread(run, n).wait for n in names]
                return
            threads = [threading.Thread(target=self._run, args=(narrow,), name=n, daemon=True)
                       for n in names]  # fmt: skip
            for thread in threads:
                thread.start()
            self._lanes[narrow] = [thread.join for thread in threads]

    def _run(self, narrow: bool) -> None:
        if self.gate is None:  # else each pass sets its own, under the gate (``_pass``)
            torch.set_num_threads(self._torch_threads)
        todo = self._queues[narrow]
        carry: object = None  # a chunk (or the stop) taken from the queue, not yet run
        previous: tuple[list[_Chunk], PendingProbabilities] | None = None
        stop = False
        while not stop:
            if previous is not None and carry is None:
                try:  # not empty() then get(): another lane may take the item between them
                    carry = todo.get_nowait()
                except queue.Empty:
                    # Nothing to overlap with: its submitters may be waiting for it to send more.
                    _deliver(*previous)
                    previous = None
            chunks, carry, stop = _next_batch(todo, carry)
            pending = self._forward(chunks) if chunks else None
            # On a GPU batch n is read back while n+1 runs; the CPU's is done already, and its
            # submitters should not wait for the next batch to stitch and write it.
            if previous is not None:
                _deliver(*previous)
                previous = None
            if pending is not None:
                try:
                    ready = pending.is_ready()  # a CUDA error raises here
                except BaseException as err:  # the lane must live: submitters wait on it
                    _fail(chunks, err)
                    continue
                if ready:
                    _deliver(chunks, pending)
                else:
                    previous = (chunks, pending)
        if previous is not None:
            _deliver(*previous)

    def _forward(self, chunks: list[_Chunk]) -> PendingProbabilities | None:
        live = [c for c in chunks if c.future.set_running_or_notify_cancel()]
        if not live:
            return None
        started = None
        try:
            # Joined here, not before: a MemoryError must fail the batch, not end the lane.
            batch = live[0].windows if len(live) == 1 else np.concatenate([c.windows for c in live])
            with self._pass(live[0].plan.threads):
                started = time.perf_counter()  # busy from here, not while waiting for cores
                pending = self._forward_fitting(batch, live[0].plan)
        except Exception as err:  # the submitters raise it, the stage lives on
            if len(live) == 1:
                _fail(live, err)
                return None
            for c in live:  # joined chunks: each alone, so an error names its own windows
                try:
                    with self._pass(c.plan.threads):
                        c.future.set_result(self._forward_fitting(c.windows, c.plan).result())
                except BaseException as alone:
                    c.future.set_exception(alone)
            return None
        except BaseException as err:
            _fail(live, err)
            return None
        finally:
            if started is not None:
                with self._lock:
                    self.stats.busy_seconds += time.perf_counter() - started
        with self._lock:
            self.stats.batches += 1
            self.stats.windows += len(batch)
        chunks[:] = live
        return pending

    def _forward_fitting(self, batch: np.ndarray, plan: PassPlan) -> PendingProbabilities:
        """The forward of ``batch``; where the device runs out of memory (a batch joined from
        several blocks' windows, beside another process's tensors), again in halves, each
        waited for, and the shape's later batches no larger than a half."""
        try:
            return self.predictor.forward(batch)
        except Exception as err:  # the device's: cuDNN's workspace says so in a RuntimeError
            if len(batch) == 1 or isinstance(err, MemoryError) or not is_out_of_memory(err):
                raise
        if self.predictor.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed pass's blocks, cached
        half = (len(batch) + 1) // 2
        with self._lock:
            self._plans[batch.shape[1:]] = dataclasses.replace(plan, limit=min(plan.limit, half))
        parts = [
            self._forward_fitting(batch[i : i + half], plan).result()
            for i in range(0, len(batch), half)
        ]
        return PendingProbabilities(torch.from_numpy(np.concatenate(parts)), None)

    @contextlib.contextmanager
    def _pass(self, threads: int) -> Iterator[None]:
        if self.gate is None:
            yield
            return
        with self.gate.model(threads):
            if torch.get_num_threads() != threads:
                # Every pass running now is as wide as this one: a wide pass runs alone.
                torch.set_num_threads(threads)
            yield


def _next_batch(
    todo: queue.Queue[object], carry: object
) -> tuple[list[_Chunk], _Chunk | None, bool]:
    """Chunks of one shape, up to the plan's limit of windows: the carried one (or the next
    queued, waiting for it), then whatever else is queued now."""
    first = carry if carry is not None else todo.get()
    if first is _STOP:
        return [], None, True
    head = cast(_Chunk, first)
    chunks, size = [head], len(head.windows)
    while head.plan.joins and size < head.plan.limit:
        try:
            item = todo.get_nowait()
        except queue.Empty:
            break
        if item is _STOP:
            return chunks, None, True
        chunk = cast(_Chunk, item)
        if (
            chunk.windows.shape[1:] != head.windows.shape[1:]
            or chunk.windows.dtype != head.windows.dtype  # uint8 is scaled, float32 not
            or chunk.plan != head.plan
            or size + len(chunk.windows) > head.plan.limit
        ):
            return chunks, chunk, False  # runs in the next batch
        chunks.append(chunk)
        size += len(chunk.windows)
    return chunks, None, False


def _fail(chunks: list[_Chunk], err: BaseException) -> None:
    for c in chunks:
        if not c.future.done():
            c.future.set_exception(err)


def _deliver(chunks: list[_Chunk], pending: PendingProbabilities) -> None:
    try:
        probabilities = pending.result()
    except BaseException as err:
        _fail(chunks, err)
        return
    start = 0
    for c in chunks:
        # A view: it keeps the batch's (pinned) buffer alive until its last reader is done.
        c.future.set_result(probabilities[start : start + len(c.windows)])
        start += len(c.windows)


# Open stages: torch's count (process-wide) may read a narrow pass's one or a run's ``threads``;
# a stage made then takes the count an open one found before its run's, else its predictor's.
_OPEN_STAGES: weakref.WeakSet[ModelStage] = weakref.WeakSet()
_OPEN_LOCK = threading.Lock()


def _process_torch_threads(predictor: Predictor) -> int:
    with _OPEN_LOCK:
        found = next((s._found for s in _OPEN_STAGES), None)
    return found or getattr(predictor, "found_threads", None) or torch.get_num_threads()
