"""The pipelined worker: one model thread fed by I/O threads through a bounded queue. Results
equal the serial path; the queue and the blocks in flight stay within their bounds however
slow the writer; failures reach the task that submitted the windows."""

import gc
import threading
import time
import weakref
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from test_execution import CLASSES, one_torch_thread, tiny_unet  # noqa: F401 (autouse fixture)
from torch import nn

import segpipe
from segpipe import models
from segpipe.execution import cluster, futures, pipeline, stitching, tasks
from segpipe.execution.pipeline import ModelStage, PassPlan
from segpipe.execution.predictor import (
    CPU_FORWARD_BUDGET,
    InferenceConfig,
    PendingProbabilities,
    Predictor,
    autocast_dtype,
)
from segpipe.execution.stitching import Stitching, predict_region
from segpipe.geometry.tiling import tile_grid
from segpipe.io.readers import ArrayReader


class FakePredictor:
    """Stands in for Predictor: probabilities are the window's mean, forward can be held."""

    def __init__(
        self,
        *,
        batch_size: int = 4,
        budget: float = 1e12,
        fail_on: float = -1.0,
        threads: int | None = None,
    ):
        self.config = InferenceConfig(device="cpu", batch_size=batch_size, threads=threads)
        self.device = torch.device("cpu")
        self.batches: list[int] = []
        self.intervals: list[tuple[float, float]] = []  # of each forward pass
        self.passes: list[tuple[int, int, str]] = []  # window side, torch threads, thread name
        self.lock = threading.Lock()
        self.seconds = 0.0
        self.hold = threading.Event()
        self.hold.set()
        self.budget = budget
        self.fail_on = fail_on

    def prepare(self, windows):
        # as Predictor.prepare: uint8 kept (scaled by forward), anything else float32
        return windows if windows.dtype == np.uint8 else windows.astype(np.float32)

    def forward(self, batch):
        self.hold.wait(10)
        start = time.perf_counter()
        time.sleep(self.seconds)
        if (batch == self.fail_on).any():
            raise ValueError("bad window")
        with self.lock:  # lanes run passes at once: each pass's records stay together
            self.batches.append(len(batch))
            self.intervals.append((start, time.perf_counter()))
            self.passes.append(
                (batch.shape[1], torch.get_num_threads(), threading.current_thread().name)
            )
        out = batch.mean(axis=(1, 2, 3)).reshape(-1, 1, 1, 1)
        return PendingProbabilities(torch.from_numpy(np.ascontiguousarray(out)), None)

    def bytes_per_pixel(self, channels):
        return 1.0

    def memory_budget(self):
        return self.budget


def windows(value: float, n: int = 1, side: int = 4) -> np.ndarray:
    return np.full((n, side, side, 1), value, np.float32)


def outputs_from_threads(stage: ModelStage, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """``stage(x)`` for each input, each called from a thread of its own, all at once."""
    results: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, stage(inputs[i])))
        for i in range(len(inputs))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [results[i] for i in range(len(inputs))]


@pytest.fixture
def recorded_stages(monkeypatch) -> list[ModelStage]:
    """Every ModelStage the block tasks make, in order."""
    stages: list[ModelStage] = []
    make_stage = pipeline.ModelStage

    def recording_stage(*args, **kwargs):
        stages.append(make_stage(*args, **kwargs))
        return stages[-1]

    monkeypatch.setattr(tasks, "ModelStage", recording_stage)
    return stages


def test_stage_equals_the_predictor_whatever_the_threads():
    net = tiny_unet()
    predictor = Predictor(net, InferenceConfig(device="cpu", batch_size=3))
    n = net.geometry.input_size(16)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (k, n, n, 3), dtype=np.uint8) for k in (1, 2, 5, 3)]
    stage = ModelStage(predictor, max_queued=2)
    results = outputs_from_threads(stage, inputs)
    stage.close()
    for i, x in enumerate(inputs):
        # batches of other sizes sum in other orders: ~1e-6 of the logits (~15 here)
        np.testing.assert_allclose(results[i], predictor(x), atol=5e-6)
    assert stage.stats.windows == sum(len(x) for x in inputs)


def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def held_first_pass(fake: FakePredictor) -> tuple[ModelStage, Future]:
    """A stage whose model thread holds a first window's pass until ``fake.hold`` is set:
    what is submitted meanwhile waits in its queue. Cores not shared: a held pass must not
    hold up the submitters' preparing (as on a GPU)."""
    stage = ModelStage(fake, max_queued=4, share_cores=False)  # type: ignore[arg-type]
    fake.hold.clear()
    first = stage.submit(windows(0))  # taken by the model thread, which is held
    _until(lambda: not stage.queued())
    return stage, first


def queued_behind_a_held_pass(
    fake: FakePredictor, later: list[np.ndarray]
) -> tuple[ModelStage, Future, list[Future]]:
    """:func:`held_first_pass` with ``later`` submitted, so that they wait in its queue
    together; the pass goes on once they are all queued."""
    stage, first = held_first_pass(fake)
    queued = [stage.submit(w) for w in later]
    fake.hold.set()
    return stage, first, queued


def test_batches_join_windows_of_several_submitters():
    fake = FakePredictor(batch_size=4)
    stage, first, later = queued_behind_a_held_pass(fake, [windows(v) for v in (1, 2, 3)])
    assert [f.result(10)[0, 0, 0, 0] for f in [first, *later]] == [0, 1, 2, 3]
    stage.close()
    assert fake.batches == [1, 3], "the three queued windows ran as one batch"


def test_on_the_cpu_a_pass_takes_one_submits_windows_only():
    """Wide passes (4 lanes, a budget of 3 windows) joined whatever other blocks had queued,
    which differs from run to run: on an 8-core CPU three runs gave three results. Windows
    queued together still run one submit at a time; one submit's several windows together."""
    fake = FakePredictor(batch_size=4, budget=48, threads=4)  # 4 x 4 px windows: 16 bytes
    stage = ModelStage(fake, max_queued=4, lanes=4)  # type: ignore[arg-type]
    assert stage.pass_plan((4, 4, 1)) == PassPlan(3, 4, narrow=False, joins=False)
    fake.hold.clear()
    first = stage.submit(windows(0))
    deadline = time.monotonic() + 10
    while stage.queued() and time.monotonic() < deadline:
        time.sleep(0.01)
    later = [stage.submit(w) for w in (windows(1), windows(2), windows(3, n=2))]
    fake.hold.set()
    assert [f.result(10)[0, 0, 0, 0] for f in [first, *later]] == [0, 1, 2, 3]
    stage.close()
    assert fake.batches == [1, 1, 1, 2]


def test_batches_never_join_uint8_windows_with_float_ones():
    """uint8 windows are scaled by the forward pass and float32 ones already are: one batch of
    both would scale neither or both."""
    fake = FakePredictor(batch_size=4)
    uint8 = [windows(v).astype(np.uint8) for v in (2, 3)]
    stage, first, later = queued_behind_a_held_pass(fake, [windows(1), *uint8])
    assert [f.result(10)[0, 0, 0, 0] for f in [first, *later]] == [0, 1, 2, 3]
    stage.close()
    assert fake.batches == [1, 1, 2], "float32 and uint8 ran apart"


def test_batches_respect_the_memory_budget():
    # 4 x 4 px windows at 1 byte a pixel: a budget of 40 bytes takes two at a time.
    fake = FakePredictor(batch_size=8, budget=40)
    stage = ModelStage(fake)  # type: ignore[arg-type]
    out = stage(windows(5, n=5))
    stage.close()
    assert out.shape == (5, 1, 1, 1)
    assert max(fake.batches) == 2


def test_a_failing_batch_fails_its_submitters_and_the_stage_lives_on():
    fake = FakePredictor(batch_size=1, fail_on=7)
    stage = ModelStage(fake)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad window"):
        stage(windows(7))
    assert stage(windows(2))[0, 0, 0, 0] == 2
    stage.close()


def test_a_joined_batch_that_fails_runs_each_submitters_windows_alone():
    """A pass joining several submitters' windows fails on one of them: each submitter gets
    its own outcome, so the error reaches (and names the windows of) the one whose window
    failed; a stitcher waiting on another block's windows would otherwise name those."""
    fake = FakePredictor(batch_size=4, fail_on=7)
    stage, first, later = queued_behind_a_held_pass(fake, [windows(v) for v in (1, 7, 3)])
    assert first.result(10)[0, 0, 0, 0] == 0
    assert later[0].result(10)[0, 0, 0, 0] == 1
    with pytest.raises(ValueError, match="bad window"):
        later[1].result(10)
    assert later[2].result(10)[0, 0, 0, 0] == 3
    assert stage(windows(2))[0, 0, 0, 0] == 2  # the stage lives on
    stage.close()
    assert fake.batches == [1, 1, 1, 1], "the failed batch of three ran again window by window"


def test_the_queue_bound_holds_while_submitters_outrun_the_model():
    fake = FakePredictor(batch_size=1)
    stage = ModelStage(fake, max_queued=2, share_cores=False)  # type: ignore[arg-type]
    fake.hold.clear()
    futures = []
    submitter = threading.Thread(
        target=lambda: futures.extend(stage.submit(windows(v)) for v in range(10))
    )
    submitter.start()
    time.sleep(0.3)
    assert submitter.is_alive(), "blocked on the full queue"
    assert stage.queued() <= 2
    fake.hold.set()
    submitter.join(10)
    assert [f.result(10)[0, 0, 0, 0] for f in futures] == list(range(10))
    stage.close()
    assert stage.stats.peak_queued <= 2


@pytest.mark.parametrize("share_cores", [True, False])
def test_io_sections_never_overlap_a_forward_pass_when_the_stage_shares_the_cores(share_cores):
    """Three I/O threads submit windows and work in sections between; with shared cores (the
    CPU's default) no section overlaps a pass, without (a GPU's) they do."""
    fake = FakePredictor(batch_size=2)
    fake.seconds = 0.01
    stage = ModelStage(fake, share_cores=share_cores)  # type: ignore[arg-type]
    sections: list[tuple[float, float]] = []

    def io_thread(value: float) -> None:
        for _ in range(8):
            with stage.io_section():
                start = time.perf_counter()
                time.sleep(0.005)
                sections.append((start, time.perf_counter()))
            assert stage(windows(value))[0, 0, 0, 0] == value

    threads = [threading.Thread(target=io_thread, args=(v,)) for v in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stage.close()
    assert len(sections) == 24 and sum(fake.batches) == 24
    overlaps = sum(a < d and c < b for a, b in fake.intervals for c, d in sections)
    assert (overlaps == 0) == share_cores
    assert (stage.gate is not None) == share_cores


def test_a_waiting_model_waits_for_the_section_and_nested_sections_do_not_wait_for_it():
    fake = FakePredictor(batch_size=1)
    stage = ModelStage(fake)  # type: ignore[arg-type]
    assert stage.gate is not None, "the CPU shares its cores by default"
    with stage.io_section():
        future = stage.submit(windows(3))  # prepares in a nested section
        deadline = time.monotonic() + 10
        while not stage.gate._model_waiting and time.monotonic() < deadline:
            time.sleep(0.005)
        assert stage.gate._model_waiting == 1
        with stage.io_section():  # would deadlock if it queued behind the waiting model
            pass
        time.sleep(0.05)
        assert not future.done(), "no pass while a section runs"
    assert future.result(10)[0, 0, 0, 0] == 3
    stage.close()


@pytest.mark.parametrize("lanes", [1, 2])
def test_stage_with_lanes_equals_the_predictor(lanes):
    """Two torch threads: small windows run narrow (one window, one thread each, side by side)
    with two lanes, wide (batches of two on both threads) with one; the probabilities are the
    predictor's either way."""
    net = tiny_unet()
    torch.set_num_threads(2)
    predictor = Predictor(net, InferenceConfig(device="cpu", batch_size=2))
    n = net.geometry.input_size(16)
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 256, (k, n, n, 3), dtype=np.uint8) for k in (3, 1, 4, 2)]
    expected = [predictor(x) for x in inputs]
    stage = ModelStage(predictor, lanes=lanes)
    narrow = lanes == 2
    assert stage.pass_plan((n, n, 3)) == pipeline.PassPlan(
        1 if narrow else 2, 1 if narrow else 2, narrow
    )
    results = outputs_from_threads(stage, inputs)
    stage.close()
    # Float rounding apart: oneDNN's convolutions may round differently for other batch sizes
    # and thread counts on some CPUs (up to 1.5e-6 here on an AMD EPYC without AVX-512).
    for i, want in enumerate(expected):
        np.testing.assert_allclose(results[i], want, rtol=0, atol=1e-5)
    assert torch.get_num_threads() == 2, "the stage leaves torch's threads as it found them"


def test_narrow_passes_run_side_by_side_and_wide_ones_alone():
    """Two cores, two lanes, a budget of 40 bytes: 4 px windows (16 bytes) run narrow, one
    torch thread each, at most two at once; 5 px windows (25 bytes, two would pass the
    budget) run wide on both threads, alone, in the one wide thread."""
    fake = FakePredictor(batch_size=4, budget=40, threads=2)
    fake.seconds = 0.05
    stage = ModelStage(fake, lanes=2)  # type: ignore[arg-type]
    assert stage.pass_plan((4, 4, 1)) == pipeline.PassPlan(1, 1, narrow=True)
    assert stage.pass_plan((5, 5, 1)) == pipeline.PassPlan(1, 2, narrow=False)

    def submitter(side: int, value: float) -> None:
        for _ in range(4):
            assert stage(windows(value, side=side))[0, 0, 0, 0] == value

    threads = [
        threading.Thread(target=submitter, args=(side, v))
        for side, v in ((4, 1), (4, 2), (4, 3), (5, 4))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stage.close()
    assert len(fake.passes) == 16
    overlapping = [sum(a < d and c < b for c, d in fake.intervals) for a, b in fake.intervals]
    # passes running at each pass's start, itself included
    at_start = [sum(c <= a < d for c, d in fake.intervals) for a, _ in fake.intervals]
    for (side, torch_threads, name), others in zip(fake.passes, overlapping, strict=True):
        if side == 4:
            assert torch_threads == 1 and name.startswith("segpipe-model-")
        else:
            assert (torch_threads, name, others) == (2, "segpipe-model", 1)
    assert max(at_start) == 2, "narrow passes ran side by side, never more than two"
    assert torch.get_num_threads() == 1, "given back as the stage found it, not its threads=2"


def test_a_slow_writer_keeps_blocks_in_flight_bounded_and_results_equal_serial(
    tmp_path, monkeypatch, recorded_stages
):
    """The in-process pipeline with a writer slower than the model: the blocks read but not
    yet written never pass the I/O threads, the model queue never passes its bound, and the
    stored result equals the serial stitcher's."""
    image = np.random.default_rng(1).integers(0, 256, (64, 72, 3), dtype=np.uint8)
    net = tiny_unet()
    in_flight, peak, lock = [0], [0], threading.Lock()
    stages = recorded_stages
    read, write = stitching.read_mirrored, tasks.write_block

    def counting_read(*args, **kwargs):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        return read(*args, **kwargs)

    def slow_write(*args, **kwargs):
        time.sleep(0.02)
        mask = write(*args, **kwargs)
        with lock:
            in_flight[0] -= 1
        return mask

    monkeypatch.setattr(stitching, "read_mirrored", counting_read)
    monkeypatch.setattr(tasks, "write_block", slow_write)
    out = segpipe.segment(
        ArrayReader(image),
        tmp_path / "r.zarr",
        net,
        tile=8,
        task_tiles=1,
        batch_size=2,
        probability_dtype="float32",
        device="cpu",
        scheduler="sync",
    )
    threads = cluster.plan_for_device("cpu").threads_per_worker
    assert peak[0] <= threads
    assert len(stages) == 1 and stages[0].stats.peak_queued <= stages[0].max_queued
    assert stages[0].stats.windows == 8 * 9
    serial = predict_region(
        list(tile_grid(image.shape[:2], 8)),
        ArrayReader(image),
        Predictor(net, InferenceConfig(device="cpu", amp=False)),
        Stitching("exact", 8, net.geometry, len(CLASSES)),
    )
    # To float rounding: the serial stitcher batches windows by four, the run one a pass.
    np.testing.assert_allclose(
        segpipe.open_result(out)["probabilities"].values, serial.probabilities, rtol=0, atol=1e-5
    )
    assert tasks._STAGES == {}, "the model thread stopped with the run"


@pytest.mark.parametrize("mode", ["exact", "blend"])
def test_a_run_with_narrow_passes_equals_one_with_one_thread(tmp_path, recorded_stages, mode):
    """Two torch threads: the run's windows go one per pass, side by side, one thread each;
    its probabilities are those of a run on one thread (one model thread, the path the
    exactness tests check against a whole-image pass), to float rounding."""
    image = np.random.default_rng(2).integers(0, 256, (72, 80, 3), dtype=np.uint8)
    net = tiny_unet()
    settings = {"window": 16, "overlap": 0.25} if mode == "blend" else {}
    results = []
    for threads in (2, 1):
        out = segpipe.segment(
            ArrayReader(image),
            tmp_path / f"r{threads}.zarr",
            net,
            tile=8,
            task_tiles=2,
            mode=mode,
            probability_dtype="float32",
            device="cpu",
            scheduler="sync",
            threads=threads,
            **settings,
        )
        results.append(segpipe.open_result(out)["probabilities"].values)
        assert torch.get_num_threads() == 1, "the caller's thread count is given back"
    narrow, single = recorded_stages
    assert narrow.lanes == 2 and single.lanes == 1
    assert narrow._plans and all(p.narrow and p.threads == 1 for p in narrow._plans.values())
    assert not any(p.narrow for p in single._plans.values())
    assert narrow.stats.windows == single.stats.windows > 0
    # Float rounding apart (one and two torch threads, batches of one and more).
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("device", "amp", "expected"),
    [
        ("cuda", True, torch.float16),  # the current device, 0: a V100
        ("cuda:0", True, torch.float16),
        ("cuda:1", True, torch.bfloat16),  # an A100
        ("cuda:1", False, None),
        ("cpu", False, None),
        ("cpu", True, torch.bfloat16),
    ],
)
def test_autocast_dtype_is_bf16_only_on_gpus_with_bf16_units(monkeypatch, device, amp, expected):
    """A V100 emulates bfloat16 (``is_bf16_supported()`` says yes, as it does by default): it
    gets float16; the device asked about decides, not the current one."""
    from types import SimpleNamespace

    majors = {0: 7, 1: 8}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(major=majors[int(i)])
    )
    assert autocast_dtype(torch.device(device), amp) is expected


def test_the_cpu_never_autocasts_by_default():
    predictor = Predictor(tiny_unet(), InferenceConfig(device="cpu"))
    assert predictor.amp is False and predictor.amp_dtype is None
    assert predictor.stream is None, "no CUDA stream off the GPU"
    assert predictor.memory_budget() == CPU_FORWARD_BUDGET
    assert predictor.bytes_per_pixel(3) > 4 * len(CLASSES)


class NotYetPending(PendingProbabilities):
    """A GPU's pending copy back: not ready when the forward call returns."""

    def is_ready(self):
        return False


@pytest.mark.parametrize("lanes", [1, 2])
def test_results_still_on_their_way_are_delivered_after_the_next_batch_or_when_idle(lanes):
    """A GPU's copy back still on its way when the forward call returns is read once the next
    batch is launched (the device works on n+1 while n comes back), or at once where nothing
    is queued. With one lane the order is checked; with two, the delivery (the race where a
    lane holding a result blocks on the queue for an item the other lane took is too narrow
    to provoke here; `_run` takes the item without blocking first)."""
    fake = FakePredictor(batch_size=1, threads=2)
    forward = fake.forward
    order: list[tuple[str, float]] = []

    class Deferred(NotYetPending):
        def result(self):
            order.append(("read", float(self._host.ravel()[0])))
            return super().result()

    def deferred(batch):
        done = forward(batch)
        order.append(("forward", float(batch.ravel()[0])))
        return Deferred(torch.from_numpy(done.result()), None)

    fake.forward = deferred
    fake.hold.clear()  # the first pass waits until every window is queued
    stage = ModelStage(fake, max_queued=8, lanes=lanes)  # type: ignore[arg-type]
    assert stage.pass_plan((4, 4, 1)).narrow == (lanes == 2)
    futures = [stage.submit(windows(v)) for v in range(6)]
    fake.hold.set()
    assert [f.result(10)[0, 0, 0, 0] for f in futures] == list(range(6))
    assert stage(windows(9))[0, 0, 0, 0] == 9, "a lone batch is delivered once the queue is idle"
    stage.close()
    if lanes == 1:
        at = {event: i for i, event in enumerate(order)}
        assert all(at["read", k] > at["forward", k + 1] for k in range(5)), order
        assert at["read", 9.0] == at["forward", 9.0] + 1


def model_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("segpipe-model")]


def test_a_closed_stage_takes_no_more_windows():
    """A task still running when its run ended must not start the model threads again: they
    would hold the model (a GPU's memory) for the worker's life."""
    stage = ModelStage(FakePredictor())
    np.testing.assert_allclose(stage(windows(1.0)).ravel(), [1.0])
    stage.close()
    with pytest.raises(pipeline.StageClosed, match="closed"):
        stage.submit(windows(2.0))
    assert not model_threads()


def test_no_windows_are_refused_not_left_waiting():
    """No chunk would ever complete the future of an empty submit: its waiter would hang."""
    stage = ModelStage(FakePredictor())
    try:
        with pytest.raises(ValueError, match="at least one window"):
            stage.submit(windows(1.0, n=0)).result(timeout=10)
        np.testing.assert_allclose(stage(windows(2.0)).ravel(), [2.0])  # and lives on
    finally:
        stage.close()


def test_close_waits_for_submitters_blocked_on_a_full_queue():
    """Submitters blocked on a full queue when the stage closes: their windows still run (no
    chunk is queued behind the stops, where no lane would take it), close returns, later
    submitters are refused, and no model thread is left."""
    fake = FakePredictor(batch_size=1)
    fake.hold.clear()  # the lane holds its first window, the queue fills behind it
    # No core gate (a GPU's stage): with one, the submitters would wait for the held pass's
    # cores before their puts.
    stage = ModelStage(fake, max_queued=1, lanes=1, share_cores=False)
    outcomes: dict[int, object] = {}

    def submit(i):
        try:
            outcomes[i] = float(stage.submit(windows(float(i))).result(20).ravel()[0])
        except pipeline.StageClosed as err:
            outcomes[i] = err

    submitters = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for t in submitters:
        t.start()
    deadline = time.monotonic() + 10
    while stage._submitting < 2 and time.monotonic() < deadline:  # one held, one queued,
        time.sleep(0.01)  # two blocked
    closer = threading.Thread(target=stage.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive(), "close waits for the blocked submitters"
    fake.hold.set()
    closer.join(10)
    for t in submitters:
        t.join(10)
    assert not closer.is_alive() and not any(t.is_alive() for t in submitters)
    assert outcomes == {i: float(i) for i in range(4)}
    with pytest.raises(pipeline.StageClosed):
        stage.submit(windows(5.0))
    assert not model_threads()


class FailingReadback(PendingProbabilities):
    def is_ready(self) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_lane_that_fails_outside_the_forward_fails_its_batch_and_lives_on(monkeypatch):
    """A CUDA error raised while asking whether a batch is back, or parts too large to join
    in memory: the batch's submitters get the error; the lane, still alive, runs what comes
    next (before, it died and every later submitter waited for ever). A batch of several
    submitters' windows too large to join runs each submitter's alone."""
    fake = FakePredictor(batch_size=4)
    forward = fake.forward
    failing = [True]

    def forward_once_failing(batch):
        pending = forward(batch)
        if failing[0]:
            failing[0] = False
            return FailingReadback(pending._host, None)
        return pending

    monkeypatch.setattr(fake, "forward", forward_once_failing)
    stage = ModelStage(fake, lanes=1)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        stage.submit(windows(1.0)).result(10)
    np.testing.assert_allclose(stage.submit(windows(2.0)).result(10).ravel(), [2.0])

    class NoMemoryToJoin:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def concatenate(*args, **kwargs):
            raise MemoryError("joining the batch")

    monkeypatch.setattr(pipeline, "np", NoMemoryToJoin())
    monkeypatch.setattr(futures, "np", NoMemoryToJoin())
    # Two submitters' windows queued together, one batch (without the failing join: 1, 2)
    other = FakePredictor(batch_size=4)
    held, first, joined = queued_behind_a_held_pass(other, [windows(4.0), windows(5.0)])
    np.testing.assert_allclose(first.result(10).ravel(), [0.0])
    for f, value in zip(joined, (4.0, 5.0), strict=True):  # each alone: no join needed
        np.testing.assert_allclose(f.result(10).ravel(), [value])
    held.close()
    assert other.batches == [1, 1, 1]
    with pytest.raises(MemoryError):  # more windows than a batch: parts joined on delivery
        stage.submit(windows(6.0, n=6)).result(10)
    monkeypatch.setattr(pipeline, "np", np)
    monkeypatch.setattr(futures, "np", np)
    np.testing.assert_allclose(stage.submit(windows(7.0, n=6)).result(10).ravel(), [7.0] * 6)
    stage.close()
    assert not model_threads()


def test_a_stage_made_beside_narrow_passes_takes_the_process_threads():
    """Narrow passes set torch's thread count to one, which other threads may then read (torch
    2.13 here: from some threads, not from others): a stage made while one runs (a second run
    on a shared worker) takes the open stage's count, not one. The count is set to one here,
    as a narrow pass may leave it, where waiting for the lanes to do it waited in vain."""
    torch.set_num_threads(2)
    fake = FakePredictor(batch_size=1)
    fake.hold.clear()
    a = ModelStage(fake)  # two lanes, one thread each
    pending = [a.submit(windows(1.0)), a.submit(windows(2.0))]
    torch.set_num_threads(1)
    made: list[ModelStage] = []
    maker = threading.Thread(target=lambda: made.append(ModelStage(FakePredictor())))
    maker.start()
    maker.join(10)
    fake.hold.set()
    for p in pending:
        p.result(10)
    assert sorted(threads for _, threads, _ in fake.passes) == [1, 1], "narrow passes"
    a.close()
    assert made[0]._torch_threads == 2 and made[0].lanes == 2
    made[0].close()
    assert torch.get_num_threads() == 2


def test_a_runs_threads_reach_no_run_beside_it_or_after_it():
    """A run naming ``threads=2`` on a worker of one thread: a run beside it naming none took
    its 2 threads and 2 lanes (one window a pass, not batches: other bits in blend mode), and
    so did every later run, as the count stayed 2 when it ended."""
    torch.set_num_threads(1)  # a Dask nanny's worker
    named = ModelStage(Predictor(tiny_unet(), InferenceConfig(device="cpu", threads=2)))
    assert torch.get_num_threads() == 2 and (named._torch_threads, named.lanes) == (2, 2)
    beside = ModelStage(Predictor(tiny_unet(1), InferenceConfig(device="cpu")))
    assert (beside._torch_threads, beside.lanes) == (1, 1)
    beside.close()
    named.close()
    assert torch.get_num_threads() == 1
    after = ModelStage(Predictor(tiny_unet(2), InferenceConfig(device="cpu")))
    assert (after._torch_threads, after.lanes) == (1, 1)
    after.close()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        # cuDNN's workspace, or a wrapper's: the allocator's words in another error type
        RuntimeError("CUDA error: out of memory"),
    ],
)
def test_a_batch_the_device_has_no_memory_for_runs_again_in_halves(monkeypatch, error):
    """A batch joined from several blocks may not fit where each block's did (a GPU shared
    with another process): it runs again in halves, every window's probabilities delivered,
    and later batches of that shape are no larger than what fitted; a single window that
    does not fit fails as before."""
    fake = FakePredictor(batch_size=8)
    forward = fake.forward
    tried: list[int] = []

    def at_most_two(batch):
        tried.append(len(batch))
        if len(batch) > 2:
            raise error
        return forward(batch)

    monkeypatch.setattr(fake, "forward", at_most_two)
    stage = ModelStage(fake, lanes=1, share_cores=False)
    values = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1) * np.ones((6, 4, 4, 1), np.float32)
    np.testing.assert_allclose(stage.submit(values).result(10).ravel(), np.arange(6))
    assert tried == [6, 3, 2, 1, 3, 2, 1]
    assert stage.pass_plan((4, 4, 1)).limit == 2  # halved twice: 8 -> 3 -> 2

    def never(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fake, "forward", never)
    with pytest.raises(torch.OutOfMemoryError):
        stage.submit(windows(1.0)).result(10)
    stage.close()


@pytest.mark.parametrize(
    ("setting", "match"), [({"max_queued": 0}, "max_queued"), ({"lanes": 0}, "lanes")]
)
def test_a_stage_refuses_an_unbounded_queue_and_no_lanes(setting, match):
    """A queue of size 0 is unbounded (queue.Queue's maxsize=0): the memory bound would be
    gone without a word; no lanes would run nothing."""
    with pytest.raises(ValueError, match=match):
        ModelStage(FakePredictor(), **setting)  # type: ignore[arg-type]


def test_max_batch_caps_a_wide_pass_below_the_predictors_batch_size():
    fake = FakePredictor(batch_size=8)
    stage = ModelStage(fake, max_batch=2)  # type: ignore[arg-type]
    assert stage.pass_plan((4, 4, 1)) == PassPlan(2, 1, narrow=False, joins=False)
    out = stage(windows(5, n=5))
    stage.close()
    assert out.shape == (5, 1, 1, 1)
    assert fake.batches == [2, 2, 1]


@pytest.mark.parametrize("lanes", [None, 2])
def test_a_stage_that_does_not_share_the_cores_runs_one_lane_on_every_thread(lanes):
    """Without the core gate (a GPU's stage) narrow passes would change torch's thread count
    beside other passes: one lane, wide passes only, whatever ``lanes`` says; its model
    thread runs on the configured threads (the caller's thread has one here)."""
    fake = FakePredictor(batch_size=4, threads=2)
    stage = ModelStage(fake, share_cores=False, lanes=lanes)  # type: ignore[arg-type]
    assert stage.lanes == 1
    assert stage.pass_plan((4, 4, 1)) == PassPlan(4, 2, narrow=False, joins=True)
    assert stage(windows(3))[0, 0, 0, 0] == 3
    stage.close()
    assert [(threads, name) for _, threads, name in fake.passes] == [(2, "segpipe-model")]


def test_close_waits_for_the_last_submitter_not_the_first_one_done():
    """Two submitters blocked on a full queue when the stage closes, the second with two
    chunks: the first is done while the second still puts; close goes on waiting, so its
    stop is queued behind the second's last chunk, which runs. Who waits where is read from
    threading.Condition's ``_waiters`` (CPython's), so that no sleep decides the order."""
    fake = FakePredictor(batch_size=1)
    forward = fake.forward
    held = {0: threading.Event(), 1: threading.Event()}

    def forward_held(batch):
        value = float(batch.ravel()[0])
        if value in held:
            held[value].wait(10)
        return forward(batch)

    fake.forward = forward_held
    stage = ModelStage(fake, max_queued=1, lanes=1, share_cores=False)  # type: ignore[arg-type]
    todo, idle = stage._queues[False], stage._idle

    first = stage.submit(windows(0))  # the lane holds its pass
    _until(lambda: not stage.queued())
    second = stage.submit(windows(1))  # the queue is full
    outcomes: dict[int, object] = {}

    def submit(value, n):
        try:
            outcomes[value] = stage.submit(windows(value, n=n)).result(10).ravel().tolist()
        except Exception as err:  # the outcome is checked
            outcomes[value] = err

    a = threading.Thread(target=submit, args=(2, 1), daemon=True)
    a.start()
    _until(lambda: len(todo.not_full._waiters) == 1)
    b = threading.Thread(target=submit, args=(3, 2), daemon=True)  # two chunks of one
    b.start()
    _until(lambda: len(todo.not_full._waiters) == 2 and stage._submitting == 2)
    closer = threading.Thread(target=stage.close, daemon=True)
    closer.start()
    _until(lambda: len(idle._waiters) == 1)
    held[0].set()  # the lane takes 1: 2 is put, its submitter is done, 3's are not
    _until(lambda: stage._submitting == 1)
    # close waits again (or, were it done waiting, waits to put its stop behind 3's first)
    _until(lambda: len(idle._waiters) == 1 or len(todo.not_full._waiters) == 2)
    held[1].set()
    for t in (closer, a, b):
        t.join(10)
    assert not closer.is_alive()
    assert first.result(10)[0, 0, 0, 0] == 0 and second.result(10)[0, 0, 0, 0] == 1
    assert outcomes == {2: [2.0], 3: [3.0, 3.0]}
    assert not model_threads()
    assert fake.batches == [1] * 5


def test_close_stops_a_lane_whose_stop_is_queued_right_behind_windows():
    """A GPU's lane (its batches join what is queued) finds the stop behind the windows it
    joins: it runs them and stops, and close returns."""
    fake = FakePredictor(batch_size=4)
    stage, first = held_first_pass(fake)
    second = stage.submit(windows(1))
    closer = threading.Thread(target=stage.close, daemon=True)
    closer.start()
    _until(lambda: stage.queued() == 2)  # the windows, then the stop
    fake.hold.set()
    closer.join(10)
    assert not closer.is_alive(), "close returned"
    assert [f.result(10)[0, 0, 0, 0] for f in (first, second)] == [0, 1]
    assert not model_threads()


def test_a_cpu_batch_is_delivered_before_the_next_pass_runs():
    """Probabilities ready when forward returns (the CPU's) reach their submitters at once, to
    stitch and write while the next batch runs; only a copy back not yet done (a GPU's) is
    delivered after the next batch is launched."""
    fake = FakePredictor(batch_size=1)
    forward = fake.forward
    third = threading.Event()

    def third_held(batch):
        if (batch == 2).all():
            third.wait(10)
        return forward(batch)

    fake.forward = third_held
    stage, first, (second, held) = queued_behind_a_held_pass(fake, [windows(1), windows(2)])
    try:
        assert first.result(5)[0, 0, 0, 0] == 0
        assert second.result(5)[0, 0, 0, 0] == 1, "delivered while the next pass is held"
        assert not held.done()
    finally:
        third.set()
    assert held.result(10)[0, 0, 0, 0] == 2
    stage.close()


def test_cancelled_windows_do_not_run_and_the_batch_they_were_joined_in_is_delivered():
    """A submitter that cancels its future while its windows wait: they leave the batch they
    were joined in, the others of that batch get their own probabilities, the lane lives on."""
    fake = FakePredictor(batch_size=4)
    stage, first = held_first_pass(fake)
    later = [stage.submit(windows(v)) for v in (1, 2, 3)]
    assert later[1].cancel()
    fake.hold.set()
    assert first.result(10)[0, 0, 0, 0] == 0
    assert later[0].result(10)[0, 0, 0, 0] == 1
    assert later[2].result(10)[0, 0, 0, 0] == 3
    assert stage(windows(4))[0, 0, 0, 0] == 4, "the lane lives on"
    stage.close()
    assert fake.batches == [1, 2, 1], "the cancelled window never ran"
    assert not model_threads()


def test_a_cancelled_submit_cut_into_chunks_runs_none_of_them(caplog):
    """Three windows at two a pass make two chunks, joined in one future: cancelling it
    cancelled nothing (both chunks ran), and the join then failed to set the cancelled
    future, an InvalidStateError logged by concurrent.futures."""
    fake = FakePredictor(batch_size=2)
    stage, first = held_first_pass(fake)
    cut = stage.submit(windows(2, n=3))
    assert cut.cancel()
    fake.hold.set()
    assert first.result(10)[0, 0, 0, 0] == 0
    assert stage(windows(4))[0, 0, 0, 0] == 4, "the lane lives on"
    stage.close()
    assert fake.batches == [1, 1], "no chunk of the cancelled submit ran"
    assert "exception calling callback" not in caplog.text


def test_a_joined_batch_takes_no_more_windows_than_its_limit():
    """A submit of one window, then one of two queued behind it, at two windows a pass: the
    two would make three, so they run in the next batch, and each submitter gets its own
    probabilities."""
    fake = FakePredictor(batch_size=2)
    stage, first, later = queued_behind_a_held_pass(fake, [windows(1), windows(2, n=2)])
    assert first.result(10).ravel().tolist() == [0]
    assert [f.result(10).ravel().tolist() for f in later] == [[1], [2, 2]]
    stage.close()
    assert fake.batches == [1, 1, 2]


def test_a_stage_runs_a_torchscript_module_whose_layers_take_no_hooks():
    """A wrapped TorchScript module takes no forward hooks: the probe counts nothing, and the
    stage still plans its passes (a floor of bytes per pixel) and runs them."""
    scripted = torch.jit.script(nn.Conv2d(3, 2, 1))
    net = models.wrap(scripted, class_names=["a", "b"], in_channels=3, halo=0, multiple=1)
    predictor = Predictor(net, InferenceConfig(device="cpu", batch_size=2))
    assert predictor.bytes_per_pixel(3) > 0
    x = np.random.default_rng(4).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    stage = ModelStage(predictor)
    try:
        np.testing.assert_allclose(stage(x), predictor(x), rtol=0, atol=1e-6)
    finally:
        stage.close()


def test_a_gpus_stages_run_their_lane_on_the_thread_the_last_one_ran_on():
    """cuDNN keeps its plans per thread: a model thread of each run's own planned every window
    shape again (30-40 ms a shape on an H200, 2 ms a pass after). A GPU's stage (no core
    gate) runs its lane on a kept thread, one stage after another on the same one, named as
    a model thread only while it runs; a CPU's stage starts its own threads."""

    class Idents(FakePredictor):
        def forward(self, batch):
            idents.append(threading.get_native_id())  # a pthread id is reused, a TID not soon
            return super().forward(batch)

    idents: list[int] = []
    for _ in range(3):
        stage = ModelStage(Idents(), share_cores=False)  # type: ignore[arg-type]
        assert stage(windows(1.0))[0, 0, 0, 0] == 1.0
        stage.close()
        assert not model_threads(), "idle between runs: no model thread holds a model"
    assert len(set(idents)) == 1 and threading.get_native_id() not in idents
    gone = weakref.ref(stage)  # the kept thread, idle, holds no stage (nor its GPU's model)
    del stage
    gc.collect()
    assert gone() is None
    cpu = ModelStage(Idents(), share_cores=True, lanes=1)  # type: ignore[arg-type]
    cpu(windows(2.0))
    cpu.close()
    assert idents[-1] not in idents[:-1]


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("a kernel failed")])
def test_a_batch_failing_for_anything_but_the_devices_memory_is_not_run_again(error):
    """Halving is for the device's memory; the host's MemoryError, or any other failure,
    fails the batch's windows at once."""
    fake = FakePredictor(batch_size=8)
    tried: list[int] = []

    def fails(batch):
        tried.append(len(batch))
        raise error

    fake.forward = fails  # type: ignore[method-assign]
    stage = ModelStage(fake, lanes=1, share_cores=False)  # type: ignore[arg-type]
    with pytest.raises(type(error)):
        stage.submit(np.ones((6, 4, 4, 1), np.float32)).result(10)
    stage.close()
    assert tried == [6]
