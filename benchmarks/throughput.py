"""Throughput of `segment` beside its model's bare forward, in one table (run by hand).

    python benchmarks/throughput.py [--size 4096] [--device cpu|cuda] [--blend-size 2048]
                                    [--tissue-size N] [--gigapixel-size N] [--keep DIR]
                                    [--rows pipeline,tissue,blend,gigapixel] [--repeat N]

For one generated slide (a 4096^2 synthetic slide mirrored to ``--size``, in a Zarr), prints:

* **bare forward**: the shipped model (``tissue-unet``) alone over the windows an exact run of
  that image computes (same window side and batches as the run picks), no reading or writing;
* **segpipe end to end**, Zarr to Zarr with the defaults (exact mode, foreground off so every
  tile is computed): ``scheduler="sync"`` (in this process) and the default scheduler (a local
  cluster, the first call paying its start-up, a second one reusing it), as a ratio to the
  bare forward (target <= 1.15 at 8192^2 with the default scheduler), and where the fastest
  sync run's time went (forward passes, the I/O threads' sections between them, the writes);
* **null-model ceiling**: the same runs with a nearly free model (``fcn``, width 4, one
  layer): what the pipeline itself can carry, whatever the accelerator (target >= 3x the 2.0
  Mpx/s sync and 1.2 Mpx/s default cluster measured before the pipelined worker, 4096^2);
* **tissue**: a demo slide (pyramidal OME-TIFF) with 30% tissue against an all-tissue one,
  foreground detection on, the default scheduler, after an untimed run (target <= 0.4x),
  with the tiles computed and mean Dice against the slide's truth, and the 30% slide with
  detection off (Dice must not drop), at ``--tissue-size`` (default ``--size``);
* **blend vs MONAI**: ``sliding_window_inference`` (gaussian, overlap 0.25, window 256, sigma
  0.125) and segpipe's blend mode with the same same-padding U-Net (width 16, depth 3, random
  weights), at ``--blend-size`` (the whole-image reference pass must fit in memory): time
  and mean absolute error of the probabilities against one forward pass over the whole
  image, overall, within 64 px of the image's border, and inside;
* **gigapixel** (only when asked for in ``--rows``): the 30%-tissue demo slide at
  ``--gigapixel-size`` (default 32768: 1.07 gigapixels) end to end once, foreground on, the
  default scheduler: the GPU target's run (under 60 s on one H100-class GPU), with the time
  the slide took to make;
* **peak RSS** of this process after the segpipe rows;
* with ``--device cuda``, the device's busy fraction during each segpipe run: CUDA events
  around every forward pass of this process, over wall time, and NVML's utilisation sampled
  every 50 ms, which sees worker processes' passes too.

A benchmark, not a test: it takes minutes and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import importlib
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import zarr

sys.path.insert(0, str(Path(__file__).parent))
from memory import add_plain_malloc, build_input

import segpipe
from segpipe import models
from segpipe.config import SegmentConfig
from segpipe.execution import predictor as predictor_module
from segpipe.execution import tasks
from segpipe.execution.cluster import local_cluster, plan_for_device
from segpipe.execution.pipeline import ModelStage
from segpipe.execution.predictor import InferenceConfig, Predictor
from segpipe.geometry.tiling import Box, exact_side, exact_windows, tile_grid
from segpipe.io.readers import ArrayReader
from segpipe.results import store as store_module
from segpipe.results.store import finalize_result, prepare_result
from segpipe.results.tiles import TileRecord

# The module, not the function ``segpipe.execution`` exports under its name
segment_module = importlib.import_module("segpipe.execution.segment")

ROWS: list[tuple[str, str, str]] = []
RUNS = 0


def row(label: str, value: str, note: str = "") -> None:
    ROWS.append((label, value, note))
    print(f"  {label:<44} {value:>14}  {note}", flush=True)


def has_setting(name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(SegmentConfig)}


def all_tiles() -> dict[str, Any]:
    # Every tile computed, so runs compare with the bare forward over the same windows.
    return {"foreground": "none"} if has_setting("foreground") else {}


@dataclasses.dataclass(frozen=True)
class Busy:
    """The device's busy fraction during a run, seen two ways: CUDA events around this
    process's forward passes (None: they ran in worker processes), and NVML's utilisation
    (the share of each sample period a kernel ran, any process's; None: no NVML)."""

    events: float | None
    nvml: float | None


class DeviceTimer:
    """CUDA events around each forward pass of every Predictor of this process, and NVML's
    utilisation of the device sampled every 50 ms (it sees worker processes' passes too)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, Any]] = []
        self.samples: list[int] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        forward = Predictor.forward

        def timed(predictor: Predictor, batch: np.ndarray) -> Any:
            stream = predictor.stream or torch.cuda.current_stream()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            pending = forward(predictor, batch)
            end.record(stream)
            self.events.append((start, end))
            return pending

        stop = threading.Event()

        def sample() -> None:
            try:
                while not stop.wait(0.05):
                    self.samples.append(torch.cuda.utilization())
            except Exception as err:  # no pynvml (nvidia-ml-py), no NVML: events only
                print(f"NVML not sampled: {err!r}", file=sys.stderr)

        sampler = threading.Thread(target=sample, name="nvml-sampler", daemon=True)
        sampler.start()
        Predictor.forward = timed  # type: ignore[method-assign]
        try:
            yield
        finally:
            Predictor.forward = forward  # type: ignore[method-assign]
            stop.set()
            sampler.join()

    def busy(self, seconds: float) -> Busy:
        """The busy fractions over the last ``seconds`` of wall time, since the last call."""
        events = None
        if self.events:
            torch.cuda.synchronize()
            events = sum(s.elapsed_time(e) for s, e in self.events) / 1000 / seconds
        nvml = sum(self.samples) / len(self.samples) / 100 if self.samples else None
        self.events.clear()
        self.samples.clear()
        return Busy(events, nvml)


class SectionTimer:
    """Where a run's wall time goes: the forward passes (``Predictor.forward``: on a GPU the
    launches and copies), the I/O threads' work between them (``ModelStage.io_section``s,
    outermost only, timed once a CPU's gate is taken, summed over the threads), of which the
    blocks' writes (sections inside ``write_block``), and the driver's part: making the
    result, recording each block, finalising (of which the pyramid pass)."""

    KEYS = ("passes", "io", "writes", "prepare", "record", "finalize", "pyramid")

    def __init__(self, io_threads: int) -> None:
        self.io_threads = io_threads
        self.seconds = dict.fromkeys(self.KEYS, 0.0)
        self._lock = threading.Lock()

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds

    def _timed(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(key, time.perf_counter() - start)

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        io_section, write_block = ModelStage.io_section, tasks.write_block
        local = threading.local()

        @contextlib.contextmanager
        def timed_io(stage: ModelStage) -> Iterator[None]:
            depth = getattr(local, "depth", 0)
            local.depth = depth + 1
            try:
                with io_section(stage):
                    start = time.perf_counter()
                    try:
                        yield
                    finally:
                        if depth == 0:
                            seconds = time.perf_counter() - start
                            self._add("io", seconds)
                            if getattr(local, "writing", False):
                                self._add("writes", seconds)
            finally:
                local.depth = depth

        def timed_write(*args: Any, **kwargs: Any) -> Any:
            local.writing = True
            try:
                return write_block(*args, **kwargs)
            finally:
                local.writing = False

        patches = [
            (Predictor, "forward", self._timed("passes", Predictor.forward)),
            (ModelStage, "io_section", timed_io),
            (tasks, "write_block", timed_write),
            (segment_module, "prepare_result", self._timed("prepare", prepare_result)),
            (segment_module, "finalize_result", self._timed("finalize", finalize_result)),
            (store_module, "build_pyramid", self._timed("pyramid", store_module.build_pyramid)),
            (TileRecord, "mark", self._timed("record", TileRecord.mark)),
        ]
        kept = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, patched in patches:
            setattr(owner, name, patched)
        try:
            yield
        finally:
            for owner, name, was in kept:
                setattr(owner, name, was)

    def summary(self, wall: float) -> str:
        s, n = self.seconds, self.io_threads
        return (
            f"passes {s['passes']:.1f} s (summed over the model threads); I/O sections "
            f"{s['io']:.1f} s summed over {n} I/O threads ({s['io'] / (n * wall):.0%} of their "
            f"time), of which writes {s['writes']:.1f} s; the driver made the result in "
            f"{s['prepare']:.2f} s, recorded the blocks in {s['record']:.2f} s and finalised "
            f"it in {s['finalize']:.2f} s (the pyramid pass {s['pyramid']:.2f} s)"
        )


def busy_note(device: str, busy: Busy | None) -> str:
    """The device's busy fraction for a row's note ("" on the CPU)."""
    if device != "cuda" or busy is None:
        return ""
    seen = [f"{busy.events:.0%} (events)"] if busy.events is not None else []
    seen += [f"{busy.nvml:.0%} (NVML)"] if busy.nvml is not None else []
    if busy.events is None:
        seen.append("no pass in this process's events: they ran in worker processes")
    return ", device busy " + ", ".join(seen)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its live children (a local cluster's worker
    processes, which a run leaves running for the next)."""
    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_forward(
    model: torch.nn.Module,
    image: np.ndarray,
    shape: tuple[int, int],
    device: str,
    config: SegmentConfig,
) -> tuple[float, float, int]:
    """Wall and CPU seconds of the model alone over the windows an exact run computes, and
    their count."""
    predictor = Predictor(model, InferenceConfig(device=device, batch_size=config.batch_size))
    grid = tile_grid(shape, config.tile)
    budget = predictor.memory_budget() / predictor.bytes_per_pixel(image.shape[2])
    windows = []
    for block in grid.blocks(config.task_tiles):
        region = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
        side = exact_side(region, config.tile, predictor.geometry, int(budget))
        windows += exact_windows(region, side, predictor.geometry)
    # Windows of each input shape (a region's cut last windows differ), batched and laid on
    # the model threads as the run does (``ModelStage``: narrow passes side by side); uint8
    # pixels, as the run submits them (scaled in the pass, which the run pays for too).
    shapes: dict[tuple[int, int], int] = {}
    for w in windows:
        shapes[w.input.shape] = shapes.get(w.input.shape, 0) + 1
    stage, channels = ModelStage(predictor), image.shape[2]
    runs = []
    for (ny, nx), count in shapes.items():
        batch = stage.pass_plan((ny, nx, channels)).limit
        crop = np.resize(image, (ny, nx, channels))  # real pixels; content does not set speed
        prepared = np.ascontiguousarray(np.stack([crop] * batch))
        # Warm-up, as a run's first pass of a shape: one batch per model thread.
        stage(np.concatenate([prepared] * stage.lanes))
        runs.append((prepared, count))
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    pending = [
        stage.submit(prepared[: min(len(prepared), count - i)])
        for prepared, count in runs
        for i in range(0, count, len(prepared))
    ]
    for p in pending:
        p.result()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    stage.close()
    return seconds, cpu, len(windows)


def run_segment(
    src: Path,
    out: Path,
    model: Any,
    device: str,
    timer: DeviceTimer | None,
    sections: SectionTimer | None = None,
    **settings: Any,
) -> tuple[float, Busy | None, float]:
    """Wall seconds of one `segment`, the device's busy fraction (CUDA only), and the CPU
    seconds of this process and its children (every thread: the driver, the workers; on a
    machine shared with other jobs a steadier measure of the work than wall time); with
    ``sections``, where its time went."""
    global RUNS
    RUNS += 1  # a fresh output each time: a complete result would be returned as it is
    out = out.with_name(f"{out.stem}-{RUNS}.zarr")
    shutil.rmtree(out, ignore_errors=True)  # left by an earlier run of this script (--keep)
    cpu = cpu_seconds()
    with contextlib.ExitStack() as installed:
        if sections is not None:
            installed.enter_context(sections.installed())
        if timer is not None:
            installed.enter_context(timer.installed())
        seconds = timed(
            lambda: segpipe.segment(src, out, model, device=device, overwrite=True, **settings)
        )
    cpu = cpu_seconds() - cpu
    return seconds, timer.busy(seconds) if timer else None, cpu


def blend_vs_monai(size: int, device: str, work: Path, rounds: int = 2) -> None:
    """MONAI's ``sliding_window_inference`` and segpipe's blend mode with the same model, each
    timed ``rounds`` times, alternating, the fastest of each kept (a first call may pay set-up
    for its shapes; alternating, a load that drifts weighs on both alike)."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        row("MONAI sliding_window_inference", "not available", "pip install -e '.[bench]'")
        return
    from segpipe.synthetic import tissue_slide

    torch.manual_seed(0)
    net = models.build("unet", width=16, depth=3, padding="same", dropout=0.0).eval()
    dev = torch.device(device)
    # MONAI gets the module as built (channels-first); segpipe converts the module it is given
    # to channels-last in place, so it gets a copy of its own.
    net = net.to(dev)
    ours_net = copy.deepcopy(net)
    image = tissue_slide(size, seed=1).image
    x = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255).to(dev)

    monai_windows = [0]

    def probabilities(t: torch.Tensor) -> torch.Tensor:
        monai_windows[0] += t.shape[0]
        return torch.softmax(net(t), 1)

    def run_monai() -> torch.Tensor:
        monai_windows[0] = 0  # count one call's
        with torch.inference_mode():
            out = sliding_window_inference(
                x, (256, 256), 4, probabilities, overlap=0.25, mode="gaussian", sigma_scale=0.125
            )
        if dev.type == "cuda":  # the call returns once its kernels are queued, not run
            torch.cuda.synchronize()
        return out

    out = work / "blend.zarr"

    def run_ours() -> float:
        return run_segment(
            ArrayReader(image),
            out,
            ours_net,
            device,
            None,
            scheduler="sync",
            mode="blend",
            window=256,
            overlap=0.25,
            sigma_scale=0.125,
            probability_dtype="float32",
            **all_tiles(),
        )[0]

    with torch.inference_mode():
        reference = probabilities(x)[0].float().cpu().numpy()
    monai_times, seg_times = [], []
    for _ in range(rounds):
        monai_times.append(timed(run_monai))
        seg_times.append(run_ours())
    monai_s, seg_s = min(monai_times), min(seg_times)
    monai = run_monai()[0].cpu().numpy()
    result = out.with_name(f"{out.stem}-{RUNS}.zarr")
    ours = segpipe.open_result(result)["probabilities"].values
    from segpipe.results import read_meta

    summary = read_meta(result).summary
    windows = {"MONAI (in RAM)": monai_windows[0], "segpipe blend (Zarr)": summary.windows}
    border = np.zeros(image.shape[:2], bool)
    border[:64], border[-64:], border[:, :64], border[:, -64:] = True, True, True, True
    for name, p, seconds in (
        ("MONAI (in RAM)", monai, monai_s),
        ("segpipe blend (Zarr)", ours, seg_s),
    ):
        err = np.abs(p - reference)
        row(
            f"{name}, {size}^2",
            f"{seconds:.1f} s",
            f"error mean {err.mean():.4f}, border {err[:, border].mean():.4f}, "
            f"inside {err[:, ~border].mean():.4f}; {windows[name]} windows",
        )
    row(
        "segpipe blend / MONAI time",
        f"{seg_s / monai_s:.2f}x",
        f"target <= 0.75; fastest of {rounds}, alternating: MONAI "
        f"{min(monai_times):.1f}-{max(monai_times):.1f} s, segpipe "
        f"{min(seg_times):.1f}-{max(seg_times):.1f} s",
    )


def tissue_rows(size: int, device: str, work: Path, model: Any, repeat: int = 1) -> None:
    """A slide with 30% tissue against an all-tissue one (pyramidal OME-TIFFs as the demo
    writes them, seed 2), foreground detection on, the default scheduler; and the 30% slide
    with detection off, for Dice against the truth with and without skipping. ``repeat``
    runs them interleaved and keeps the fastest of each."""
    from segpipe.analysis.evaluation import evaluate
    from segpipe.results import read_meta
    from segpipe.synthetic.demo import make_demo_slide

    runs: dict[tuple[float, str], list[float]] = {}
    cpu: dict[tuple[float, str], list[float]] = {}
    dice, summaries = {}, {}
    tile = SegmentConfig().tile
    keys = ((0.3, "tissue"), (1.0, "tissue"), (0.3, "none"))
    slides = {
        f: make_demo_slide(work / "slides", size=size, seed=2, tissue_fraction=f)
        for f in (0.3, 1.0)
    }
    # Untimed: a process's first run pays the local cluster's start and the device's first
    # passes (on an H200 the 30% slide, run first, took 12.4 s against the all-tissue
    # slide's 4.1 s); the pipeline rows' first call is where that cost is shown.
    run_segment(slides[0.3].image, work / "tissue.zarr", model, device, None, foreground="tissue")
    for _ in range(repeat):
        for key in keys:
            fraction, foreground = key
            seconds, _, cpu_seconds = run_segment(
                slides[fraction].image,
                work / "tissue.zarr",
                model,
                device,
                None,
                foreground=foreground,
            )
            runs.setdefault(key, []).append(seconds)
            cpu.setdefault(key, []).append(cpu_seconds)
            out = work / f"tissue-{RUNS}.zarr"
            dice[key] = evaluate(out, slides[fraction].truth).mean_dice
            summary = read_meta(out).summary
            assert summary is not None
            summaries[key] = summary
    seconds = {key: min(times) for key, times in runs.items()}
    spread = {
        key: f"; fastest of {len(t)}: {min(t):.1f}-{max(t):.1f} s" if len(t) > 1 else ""
        for key, t in runs.items()
    }
    for key in keys:
        summary = summaries[key]
        if key == (0.3, "tissue"):
            truth = zarr.open_array(slides[0.3].truth, mode="r")[...] > 0
            n = -(-size // tile)
            padded = np.zeros((n * tile, n * tile), bool)
            padded[:size, :size] = truth
            touched = padded.reshape(n, tile, n, tile).any(axis=(1, 3)).mean()
            row(
                f"30% tissue slide, {size}^2, foreground on",
                f"{seconds[key]:.1f} s",
                f"tissue {truth.mean():.0%} of the pixels, in {touched:.0%} of the {tile} px "
                f"tiles; {summary.tiles_computed} of {summary.tiles_total} tiles computed "
                f"({summary.windows} windows over boxes around the tissue); "
                f"Dice {dice[key]:.4f}{spread[key]}",
            )
        else:
            fraction, foreground = key
            row(
                f"{'all' if fraction == 1 else '30%'} tissue slide, {size}^2, foreground "
                + ("on" if foreground == "tissue" else "off"),
                f"{seconds[key]:.1f} s",
                f"{summary.tiles_computed} of {summary.tiles_total} tiles computed; "
                f"Dice {dice[key]:.4f}{spread[key]}",
            )
    # CPU seconds (on the CPU the default local cluster is threads of this process): the
    # work's ratio, steadier than wall time on a shared machine; the target is the wall's.
    least = {key: min(c) for key, c in cpu.items()}
    row(
        f"30% / all tissue, {size}^2",
        f"{seconds[0.3, 'tissue'] / seconds[1.0, 'tissue']:.2f}x",
        f"target <= 0.4 ({least[0.3, 'tissue'] / least[1.0, 'tissue']:.2f}x their CPU s); "
        f"Dice with skipping minus without: {dice[0.3, 'tissue'] - dice[0.3, 'none']:+.4f}",
    )


def gigapixel_row(size: int, device: str, work: Path, model: Any) -> None:
    """The 30%-tissue demo slide at ``size`` (a pyramidal OME-TIFF, seed 2) segmented once,
    foreground on, the default scheduler: the time, the device's busy fraction (CUDA) and
    the tiles computed."""
    from segpipe.results import read_meta
    from segpipe.synthetic.demo import make_demo_slide

    made = time.perf_counter()
    slide = make_demo_slide(work / "slides", size=size, seed=2, tissue_fraction=0.3)
    made = time.perf_counter() - made
    timer = DeviceTimer() if device == "cuda" else None
    seconds, busy, cpu = run_segment(
        slide.image, work / "gigapixel.zarr", model, device, timer, foreground="tissue"
    )
    summary = read_meta(work / f"gigapixel-{RUNS}.zarr").summary
    assert summary is not None
    row(
        f"30% tissue slide, {size}^2 ({size * size / 1e9:.2f} Gpx)",
        f"{seconds:.1f} s",
        f"{size * size / 1e6 / seconds:.3g} Mpx/s, {cpu:.0f} CPU s"
        + busy_note(device, busy)
        + f"; {summary.tiles_computed} of {summary.tiles_total} tiles computed; "
        f"target < 60 s on one H100-class GPU; the slide took {made:.0f} s to make",
    )


def sizes(args: argparse.Namespace, rows: set[str]) -> str:
    """The slide side of each group of rows asked for, e.g. ``pipeline 4096^2, blend 2048^2``."""
    side = {
        "pipeline": args.size,
        "tissue": args.tissue_size or args.size,
        "blend": args.blend_size,
        "gigapixel": args.gigapixel_size,
    }
    return ", ".join(f"{group} {n}^2" for group, n in side.items() if group in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blend-size", type=int, default=2048)
    parser.add_argument("--tissue-size", type=int, default=None, help="default: --size")
    parser.add_argument("--gigapixel-size", type=int, default=32768)
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="pipeline and tissue rows: run the bare forward, each end-to-end row and each "
        "tissue row this many times, interleaved, and keep the fastest (the first call only "
        "once)",
    )
    parser.add_argument(
        "--rows",
        default="pipeline,tissue,blend",
        help="which groups of rows, comma-separated: pipeline (bare forward, end to end, "
        "null model, peak RSS), tissue, blend, gigapixel (not by default)",
    )
    add_plain_malloc(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():  # before minutes of input
        parser.error("--device cuda: torch sees no CUDA GPU on this machine")
    if args.repeat < 1:
        parser.error(f"--repeat must be 1 or more, got {args.repeat}")
    if args.plain_malloc:  # glibc read its settings at start; this one tells segpipe to keep out
        os.environ["MALLOC_MMAP_MAX_"] = "65536"
    # Before any thread allocates, as the segpipe command does.
    tuned = segpipe.keep_freed_memory()
    rows = set(args.rows.split(","))
    if unknown := rows - {"pipeline", "tissue", "blend", "gigapixel"}:
        parser.error(f"--rows: no such group {', '.join(sorted(unknown))}")
    size, device = args.size, args.device
    work = args.keep or Path(tempfile.mkdtemp(prefix="segpipe-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.keep is None:  # gigabytes at the sizes measured: gone when the run ends
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    src = work / f"input-{size}.zarr"
    if "pipeline" in rows and not src.exists():
        print(f"building {size} x {size} input ...", flush=True)
        build_input(src, size)
    plan = plan_for_device(device)
    load = os.getloadavg()[0]
    print(
        f"\nsegpipe throughput ({sizes(args, rows)}); "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"plan {plan}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
        + f"; CPU forward budget {predictor_module.CPU_FORWARD_BUDGET >> 20} MiB"
        + f"; malloc {'keeps freed memory' if tuned else 'as it was'}"
        + f"; load average {load:.1f} on {os.cpu_count()} cores at the start\n",
        flush=True,
    )
    shipped = models.load("tissue-unet")
    if "pipeline" in rows:
        pipeline_rows(src, size, device, work, shipped, args.repeat)
    if "tissue" in rows:
        tissue_rows(args.tissue_size or size, device, work, shipped, args.repeat)
    if "blend" in rows:
        blend_vs_monai(args.blend_size, device, work, max(2, args.repeat))
    if "gigapixel" in rows:
        gigapixel_row(args.gigapixel_size, device, work, shipped)

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n| measure | value | note |\n|---|---|---|")
    for label, value, note in ROWS:
        print(f"| {label} | {value} | {note} |")


def pipeline_rows(
    src: Path, size: int, device: str, work: Path, shipped: Any, repeat: int = 1
) -> None:
    mpx = size * size / 1e6
    config = SegmentConfig()
    here = plan_for_device(device, processes=False)  # the sync runs' I/O threads
    image = zarr.open_array(src, mode="r")[:1200, :1200]
    timer = DeviceTimer() if device == "cuda" else None

    # Interleaved and repeated, the fastest of each kept: on a shared machine other jobs only
    # ever slow a run down, and interleaving spreads a slow spell over every row.
    schedulers = {"sync": "sync", "default, first call": None, "default, reused": None}
    bare_runs: list[tuple[float, float, int]] = []
    runs: dict[str, list[tuple[float, Busy | None, float]]] = {k: [] for k in schedulers}
    breakdowns: list[tuple[float, SectionTimer]] = []  # of the sync runs
    for r in range(repeat):
        bare_runs.append(bare_forward(shipped, image, (size, size), device, config))
        for label, scheduler in schedulers.items():
            if label == "default, first call" and r:
                continue  # only the first call starts the cluster
            out = work / "out.zarr"
            sections = SectionTimer(here.threads_per_worker) if scheduler == "sync" else None
            measured = run_segment(
                src, out, shipped, device, timer, sections, scheduler=scheduler, **all_tiles()
            )
            runs[label].append(measured)
            if sections is not None:
                breakdowns.append((measured[0], sections))
    bare, bare_cpu, n_windows = min(bare_runs)
    spread = lambda xs: f"{min(xs):.1f}-{max(xs):.1f} s" if len(xs) > 1 else ""  # noqa: E731
    row(
        "bare forward, tissue-unet",
        f"{mpx / bare:.2f} Mpx/s",
        f"{bare:.1f} s ({bare_cpu:.0f} CPU s), {n_windows} windows"
        + (f"; fastest of {repeat}: {spread([b[0] for b in bare_runs])}" if repeat > 1 else ""),
    )
    for label, measured in runs.items():
        seconds, busy, cpu = min(measured, key=lambda m: m[0])
        note = f"{seconds / bare:.2f}x bare forward ({cpu / bare_cpu:.2f}x its CPU s)"
        note += busy_note(device, busy)
        if len(measured) > 1:
            note += f"; fastest of {len(measured)}: {spread([m[0] for m in measured])}"
        row(f"segpipe end to end, {label}", f"{mpx / seconds:.2f} Mpx/s", note)
    fastest, sections = min(breakdowns, key=lambda b: b[0])
    row("  where the sync run's time went", f"{fastest:.1f} s", sections.summary(fastest))
    plan = plan_for_device(device)
    if plan.processes:
        # The default runs work under IN_PROCESS_BELOW_PX here: its worker processes (GPUs),
        # started first, by address.
        with local_cluster(plan) as address:
            settings = {"scheduler": address, **all_tiles()}
            shared = [
                run_segment(src, work / "out.zarr", shipped, device, timer, **settings)
                for _ in range(2)
            ]
        seconds, busy, cpu = min(shared, key=lambda m: m[0])
        row(
            f"segpipe end to end, {plan.n_workers} worker processes",
            f"{mpx / seconds:.2f} Mpx/s",
            f"{seconds / bare:.2f}x bare forward ({cpu / bare_cpu:.2f}x its CPU s)"
            f"{busy_note(device, busy)}; faster of 2: {spread([m[0] for m in shared])}",
        )

    null = models.build("fcn", width=4, layers=1).eval()
    for label, scheduler, before in (("sync", "sync", 2.0), ("default", None, 1.2)):
        seconds, _, cpu = run_segment(
            src, work / "null.zarr", null, device, None, scheduler=scheduler, **all_tiles()
        )
        row(
            f"null-model ceiling, {label}",
            f"{mpx / seconds:.2f} Mpx/s",
            f"{mpx / seconds / before:.1f}x the {before} Mpx/s before (target >= 3x); "
            f"{mpx / cpu:.2f} Mpx per CPU s",
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row("peak RSS after the segpipe rows", f"{peak:.0f} MiB")


if __name__ == "__main__":
    main()
