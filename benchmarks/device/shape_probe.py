"""Whether a GPU pass over a window shape seen before costs more than one over the same shape
again (stop 52): the 30%-tissue slide's window shapes, timed pass by pass, twice over."""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import throughput as T

from segpipe import models
from segpipe.execution.predictor import Predictor
from segpipe.synthetic.demo import make_demo_slide

work = Path("/tmp/segpipe-bench")
slide = make_demo_slide(work / "slides", size=8192, seed=2, tissue_fraction=0.3)
model = models.load("tissue-unet")
shapes = []
orig = Predictor.forward


def forward(self, batch):
    shapes.append(batch.shape)
    return orig(self, batch)


Predictor.forward = forward
T.run_segment(slide.image, work / "shapes.zarr", model, "cuda", None, foreground="tissue")
Predictor.forward = orig
print(
    "alloc conf",
    os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    "benchmark",
    torch.backends.cudnn.benchmark,
)
net = model.eval().cuda().to(memory_format=torch.channels_last)
distinct = sorted(set(shapes))
print(
    len(shapes),
    "passes,",
    len(distinct),
    "shapes; pixels",
    sum(s[0] * s[1] * s[2] for s in shapes) / 1e6,
    "M",
)


def sweep(order, label):
    stats0 = torch.cuda.memory_stats()
    t0 = time.perf_counter()
    times = []
    for s in order:
        x = torch.zeros((s[0], s[3], s[1], s[2]), device="cuda").contiguous(
            memory_format=torch.channels_last
        )
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            torch.softmax(net(x), 1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    stats = torch.cuda.memory_stats()
    print(
        f"{label}: {time.perf_counter() - t0:.2f} s for {len(order)} passes; "
        f"median {sorted(times)[len(times) // 2] * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms; "
        f"cudaMallocs {stats['segment.all.allocated'] - stats0['segment.all.allocated']}, "
        f"retries {stats['num_alloc_retries'] - stats0['num_alloc_retries']}",
        flush=True,
    )


sweep(shapes, "the run's passes, first time here")
sweep(shapes, "the same again")
sweep([shapes[0]] * len(shapes), "one shape, as many passes")
torch.backends.cudnn.benchmark = True
sweep(shapes, "benchmark=True, first")
sweep(shapes, "benchmark=True, again")
