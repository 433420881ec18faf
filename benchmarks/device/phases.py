"""A py-spy raw profile (``py-spy record -f raw --threads``) summed by thread and by phase.

    python benchmarks/device/phases.py PROFILE [--rate 200]

Each sample goes to the phase of its innermost frame that names one (``PHASES``: segpipe's
steps, Zarr's event loop, torch); idle waits are counted apart. Seconds are thread-seconds.
"""

from __future__ import annotations

import argparse
import collections
import re

# (phase, text in a frame): the innermost frame holding one of these names the phase
PHASES = [
    ("waiting", "threading.py"),
    ("waiting", "queue.py"),
    ("waiting", "selectors.py"),
    ("waiting", "concurrent/futures/_base.py"),
    ("idle pool thread", "concurrent/futures/thread.py:8"),
    ("import", "<frozen importlib"),
    ("forward (model)", "torch/nn/"),
    ("forward (predictor)", "execution/predictor.py"),
    ("zstd encode", "ShardFormat.encode"),
    ("shard decode", "ShardFormat.decode"),
    ("zarr codecs", "zarr/codecs/"),
    ("zarr event loop", "asyncio/"),
    ("float16/argmax", "results/encoding.py"),
    ("pyramid in blocks", "block_levels"),
    ("pyramid pass", "build_pyramid"),
    ("read input", "io/readers/"),
    ("stitch", "execution/stitching.py"),
    ("store files", "zarr/storage/"),
    ("layout", "results/layout.py"),
    ("tile record", "results/tiles.py"),
    ("write block", "results/store.py"),
    ("task", "execution/tasks.py"),
    ("stage", "execution/pipeline.py"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--rate", type=float, default=200.0, help="py-spy's samples a second")
    args = parser.parse_args()
    by_phase: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    with open(args.profile) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            thread = re.sub(r"[\d_-]+$", "", frames[0].split(": ")[-1])
            by_thread[thread] += n
            phase = "other: " + (frames[-1].split(" (")[0] if len(frames) > 1 else "?")
            for frame in reversed(frames[1:]):
                hit = next((p for p, text in PHASES if text in frame), None)
                if hit is not None:
                    phase = hit
                    break
            by_phase[phase] += n
    for title, counts in (("threads", by_thread), ("phases", by_phase)):
        print(f"{title} (thread-seconds):")
        for name, n in counts.most_common(30):
            print(f"  {n / args.rate:8.2f}  {name}")


if __name__ == "__main__":
    main()
