"""Runs to profile on the lent GPU machine (``check.sh`` runs this under py-spy): ``segment``
of the 8192^2 benchmark input with the shipped model, ``scheduler="sync"``, one untimed run
and then ``--runs`` timed ones, each printed with its device busy fraction.

    python benchmarks/device/profile_run.py [--size 8192] [--device cuda] [--runs 3]
                                            [--work /tmp/segpipe-bench] [--io-threads N]
                                            [--torch-threads N] [--model tissue-unet|null]
                                            [--switch-interval SECONDS] [--set NAME=VALUE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
import throughput
from memory import build_input

import segpipe
from segpipe import models
from segpipe.execution import cluster, plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/segpipe-bench"))
    parser.add_argument("--io-threads", type=int, default=None, help="default: the plan's")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="SegmentConfig.threads (default: the plan's); torch's count is the process's, so "
        "the I/O threads' torch work (float16 casts) runs on as many",
    )
    parser.add_argument("--model", default="tissue-unet", help="or 'null': fcn width 4")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval (Python's default 0.005 s): how long a thread waiting for "
        "the GIL waits before asking its holder to let go. The model thread lets go of it in "
        "every torch op and takes it back after, beside I/O threads that hold it",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a SegmentConfig setting for the runs (an int where it reads as one), e.g. "
        "task_tiles=4; may be repeated",
    )
    args = parser.parse_args()
    settings = {
        name: int(value) if value.isdigit() else value
        for name, _, value in (item.partition("=") for item in args.set)
    }
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"input-{args.size}.zarr"
    if not src.exists():
        build_input(src, args.size)
    segpipe.keep_freed_memory()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.io_threads is not None:
        plans._io_threads = lambda cores: args.io_threads  # type: ignore[assignment]
    model = (
        models.build("fcn", width=4, layers=1).eval()
        if args.model == "null"
        else models.load(args.model)
    )
    plan = cluster.plan_for_device(args.device, processes=False)  # sync: this process's
    mpx = args.size**2 / 1e6
    for run in range(args.runs + 1):
        timer = throughput.DeviceTimer() if args.device == "cuda" else None
        sections = throughput.SectionTimer(plan.threads_per_worker)
        out = args.work / "profiled.zarr"
        start = time.perf_counter()
        seconds, busy, cpu = throughput.run_segment(
            src, out, model, args.device, timer, sections, scheduler="sync", foreground="none",
            threads=args.torch_threads, **settings,
        )  # fmt: skip
        shutil.rmtree(out.with_name(f"{out.stem}-{throughput.RUNS}.zarr"), ignore_errors=True)
        print(
            f"{'untimed' if run == 0 else f'run {run}'}: {seconds:.2f} s, {mpx / seconds:.2f} "
            f"Mpx/s, {cpu:.1f} CPU s{throughput.busy_note(args.device, busy)}; "
            f"{sections.summary(seconds)} ({time.perf_counter() - start:.1f} s with clean-up)",
            flush=True,
        )


if __name__ == "__main__":
    main()
