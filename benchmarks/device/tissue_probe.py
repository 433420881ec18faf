"""Where the 30%-tissue slide's time goes on the lent GPU (stop 52): each run's sections."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
import throughput as T

import segpipe
from segpipe import models
from segpipe.execution import segment as seg_module
from segpipe.execution.predictor import Predictor
from segpipe.synthetic.demo import make_demo_slide

segpipe.keep_freed_memory()
device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
work = Path("/tmp/segpipe-bench")
slides = {
    f: make_demo_slide(work / "slides", size=8192, seed=2, tissue_fraction=f) for f in (0.3, 1.0)
}
model = models.load("tissue-unet")
shapes, fwd = [], [0.0]
orig_forward = Predictor.forward


def forward(self, batch):
    shapes.append(batch.shape)
    t = time.perf_counter()
    try:
        return orig_forward(self, batch)
    finally:
        fwd[0] += time.perf_counter() - t


Predictor.forward = forward
sel = [0.0]
orig_select = seg_module.select_tiles


def select(*a, **k):
    t = time.perf_counter()
    try:
        return orig_select(*a, **k)
    finally:
        sel[0] += time.perf_counter() - t


seg_module.select_tiles = select
settings = {k: int(v) if v.isdigit() else v for k, v in (x.split("=") for x in sys.argv[2:])}
for rnd in range(2):
    for f, fg in ((0.3, "tissue"), (1.0, "tissue"), (0.3, "none")):
        shapes.clear()
        fwd[0] = sel[0] = 0.0
        sec = T.SectionTimer(8)
        s, _, cpu = T.run_segment(
            slides[f].image,
            work / "probe.zarr",
            model,
            device,
            None,
            sec,
            foreground=fg,
            **settings,
        )
        print(
            f"round {rnd} {f} {fg}: {s:.2f} s, {cpu:.1f} CPU s; {len(shapes)} passes in "
            f"{len(set(shapes))} shapes, forward calls {fwd[0]:.2f} s; "
            f"select_tiles {sel[0]:.2f} s; "
            f"{sec.summary(s)}",
            flush=True,
        )
