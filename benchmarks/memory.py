"""Peak memory of `segment` must not grow with the image: 4096^2 vs 16384^2 (run by hand).

    python benchmarks/memory.py [--sizes 4096 16384] [--model tissue-unet] [--workers N]
                                [--plain-malloc]

For each size, builds an RGB Zarr input chunk by chunk (a 4096^2 synthetic slide, mirrored
to fill the size, so building it never holds the big image), then runs `segpipe.segment` with
its defaults (local Dask cluster) in a fresh process (which first calls
`segpipe.keep_freed_memory()`, as the segpipe command does, unless `--plain-malloc`) while
sampling the resident memory of that process and all its children (driver, scheduler,
workers) every 0.1 s. Prints peak RSS, time and throughput per size, and the ratio of peaks:
the target is <= 1.5.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

CHUNK = 1024


def build_input(path: Path, size: int, seed: int = 0) -> Path:
    from segpipe.synthetic import tissue_slide

    base = tissue_slide(min(size, 4096), seed=seed).image
    arr = zarr.create_array(
        path,
        shape=(size, size, 3),
        chunks=(CHUNK, CHUNK, 3),
        dtype="uint8",
        dimension_names=("y", "x", "c"),
        overwrite=True,
    )
    n = base.shape[0]
    for y in range(0, size, CHUNK):
        for x in range(0, size, CHUNK):
            # Mirror the base slide across the plane so seams look like tissue, not edges.
            iy = np.arange(y, min(y + CHUNK, size)) % (2 * n)
            ix = np.arange(x, min(x + CHUNK, size)) % (2 * n)
            iy = np.where(iy < n, iy, 2 * n - 1 - iy)
            ix = np.where(ix < n, ix, 2 * n - 1 - ix)
            arr[y : y + len(iy), x : x + len(ix)] = base[np.ix_(iy, ix)]
    return path


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit between calls
            total += p.memory_info().rss
    return total


def measure(source: Path, output: Path, model: str, workers: int | None, keep: bool) -> dict:
    code = (
        "import segpipe, sys, json; "
        f"segpipe.keep_freed_memory() if {keep!r} else None; "
        f"p = segpipe.segment({str(source)!r}, {str(output)!r}, {model!r}, "
        f"n_workers={workers!r}, pixel_size_um=0.5); "
        "print(json.dumps(segpipe.open_result(p).attrs['segpipe']))"
    )
    start = time.perf_counter()
    # Plain: glibc's own default, which segpipe takes for a user's setting and leaves alone
    # (the CPU predictor would otherwise make the call itself).
    env = {**os.environ, "MALLOC_MMAP_MAX_": "65536"} if not keep else None
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"segment failed for {source} (exit {proc.returncode})")
    meta = json.loads(out.strip().splitlines()[-1])
    return {"peak_rss_mib": peak / 2**20, "wall_s": time.perf_counter() - start, "meta": meta}


def add_plain_malloc(parser: argparse.ArgumentParser) -> None:
    """The flag both benchmarks take to run with glibc's malloc as it is."""
    parser.add_argument(
        "--plain-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (by default the script calls "
        "segpipe.keep_freed_memory() first, as the segpipe command does)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--model", default="tissue-unet")
    parser.add_argument("--workers", type=int, default=None)
    add_plain_malloc(parser)
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="segpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.keep is None:  # gigabytes at the sizes measured: gone when the run ends
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    rows = []
    for size in args.sizes:
        src = work / f"input-{size}.zarr"
        if not src.exists():
            print(f"building {size} x {size} input ...", flush=True)
            build_input(src, size)
        out = work / f"result-{size}.zarr"
        shutil.rmtree(out, ignore_errors=True)  # a complete one left by --keep returns at once
        print(f"segmenting {size} x {size} ...", flush=True)
        r = measure(src, out, args.model, args.workers, not args.plain_malloc)
        mpx = size * size / 1e6
        rows.append((size, r["peak_rss_mib"], r["wall_s"], r["meta"]["seconds"], mpx))
        print(
            f"  {size:>6}^2  peak RSS {r['peak_rss_mib']:8.0f} MiB  wall {r['wall_s']:7.1f} s  "
            f"segment {r['meta']['seconds']:7.1f} s  {mpx / r['meta']['seconds']:.2f} Mpx/s",
            flush=True,
        )
    print("\nsize      peak RSS (MiB)   segment (s)   Mpx/s")
    for size, rss, _, seconds, mpx in rows:
        print(f"{size:>6}^2  {rss:14.0f}   {seconds:11.1f}   {mpx / seconds:5.2f}")
    if len(rows) >= 2:
        ratio = rows[-1][1] / rows[0][1]
        pixels = rows[-1][4] / rows[0][4]
        verdict = "OK" if ratio <= 1.5 else "TOO HIGH"
        print(
            f"\npeak RSS ratio {rows[-1][0]}^2 / {rows[0][0]}^2 = {ratio:.2f} "
            f"for {pixels:.0f}x the pixels (target <= 1.5: {verdict})"
        )


if __name__ == "__main__":
    main()
