"""Train every registered model the same way and compare them in one table (run by hand).

    python benchmarks/models.py                # the defaults below
    python benchmarks/models.py --steps 60     # a quick look

Each model (``unet`` with and without the U-Net border weights, then every other architecture
in ``segpipe.models.available()``: ``fcn``, ``fcn-updown``, ``sliding-window`` when present)
is trained on the same synthetic tissue slides with the same budget (optimiser steps, batch,
label-crop side, learning rate, seed), then scored on one held-out slide:

The sliding-window classifier really runs one patch per output pixel, so a 48 x 48 label crop
costs it 2 304 patch classifications per sample (about 25x a U-Net step here); it gets the same
steps and batch but a smaller label crop (``--sliding-window-patch``, 8: 64 pixels per sample),
which is how such a classifier is trained anyway: on patches around sampled pixels.

* **parameters**;
* **Mpx/s**: megapixels per second of inference over a fixed image, tile by tile
  (``segpipe.execution.stitching.predict_labels``, eval mode, no autograd), after one warm-up
  tile; the wall time of the whole image, including mirroring and stitching, on this
  machine's threads;
* **mean IoU** of the classes other than background;
* **object F1**: nuclei (connected components of the predicted nucleus class) matched 1:1 to
  true nuclei at IoU >= 0.5; the slides are full of touching nuclei, which a model that does
  not keep them apart merges, and each merge costs a match.

In the generated labels touching nuclei share an edge, so even a perfect class map merges
them (object F1 about 0.24 on the validation slide). As in the U-Net paper, whose annotations
leave a background line between touching cells, the models train on labels with such gaps
(``TrainConfig.separate_touching``); the first row scores the gap labels themselves, the
ceiling of any model that predicts classes, and "unet, no gaps" shows the model trained on the
labels as generated. The border weights of ``loss_weights="unet"`` weigh exactly those gaps.

A benchmark, not a test: it takes minutes and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from segpipe import models
from segpipe.analysis.evaluation import evaluate_labels, evaluate_model
from segpipe.execution.stitching import predict_labels
from segpipe.synthetic import CLASS_NAMES, tissue_slide
from segpipe.training import TrainConfig, initial_model, train
from segpipe.training.datasets import separate_touching


def variants(width: int) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(label, architecture, model options, training options) for every registered model.

    All train on labels with gaps between touching nuclei (``separate_touching``) but one,
    the U-Net on the labels as generated, which shows what the gaps are worth.
    """
    gaps = {"separate_touching": True}
    out: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    unet = {"width": width, "depth": 3, "padding": "valid", "dropout": 0.1}
    if "unet" in models.available():
        out.append(("unet, no gaps", "unet", unet, {}))
        out.append(("unet", "unet", unet, gaps))
        out.append(("unet + border weights", "unet", unet, {**gaps, "loss_weights": "unet"}))
    for name in models.available():
        if name == "unet":
            continue
        fields = {f.name for f in dataclasses.fields(models.base.REGISTRY[name].config_class)}
        out.append((name, name, {"width": width} if "width" in fields else {}, gaps))
    return out


def variants_for(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    out = []
    for label, name, options, overrides in variants(args.width):
        if name == "sliding-window":
            overrides = {**overrides, "patch": args.sliding_window_patch}
        if not args.only or label in args.only:
            out.append((label, name, options, overrides))
    return out


def throughput(model: torch.nn.Module, image: np.ndarray, tile: int, repeats: int = 3) -> float:
    """Megapixels per second of ``predict_labels`` over ``image``: the fastest of ``repeats``
    passes after one warm-up tile (on a shared machine the slower ones measure the others)."""
    model.eval()
    g = models.geometry_of(model)
    tile = max(g.multiple, tile - tile % g.multiple)
    predict_labels(model, image[:tile, :tile], tile=tile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict_labels(model, image, tile=tile)
        best = min(best, time.perf_counter() - start)
    return image.shape[0] * image.shape[1] / 1e6 / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch", type=int, default=48, help="label-crop side, pixels")
    parser.add_argument(
        "--sliding-window-patch", type=int, default=8, help="its label-crop side, pixels"
    )
    parser.add_argument("--width", type=int, default=16, help="first-layer channels")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--slide-size", type=int, default=1024)
    parser.add_argument("--val-size", type=int, default=384)
    parser.add_argument("--bench-size", type=int, default=256, help="inference image side")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--only", nargs="*", help="labels to run (default all)")
    args = parser.parse_args(argv)
    known = [label for label, *_ in variants(args.width)]
    if unknown := sorted(set(args.only or ()) - set(known)):  # a typo ran no model, exit 0
        parser.error(f"--only {' '.join(unknown)}: no such label; the labels are {known}")

    torch.set_num_threads(args.threads)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        patch=args.patch,
        lr=args.lr,
        slide_size=args.slide_size,
        num_slides=2,
        val_size=args.val_size,
        val_tile=64,
        num_threads=args.threads,
        progress=False,
    )
    val = tissue_slide(args.val_size, seed=config.val_seed)
    bench = tissue_slide(args.bench_size, seed=config.val_seed + 1).image
    print(
        f"tissue slides: 2 x {args.slide_size}^2 training, {args.val_size}^2 validation; "
        f"{args.steps} steps x batch {args.batch_size} x label crop {args.patch}; "
        f"inference on {args.bench_size}^2 px; {args.threads} threads",
        flush=True,
    )
    # The ceiling of any model that predicts classes: the gap labels themselves.
    oracle = evaluate_labels(
        separate_touching(val).labels,
        val.labels,
        class_names=CLASS_NAMES,
        instances=val.instances,
        object_class="nucleus",
    )
    rows: list[tuple[str, int, float, float, float, float]] = [
        ("(labels with gaps)", 0, float("nan"), oracle.mean_iou, oracle.objects.f1, 0.0)
    ]
    for label, name, options, overrides in variants_for(args):
        model = initial_model(name, class_names=CLASS_NAMES, seed=config.seed, **options)
        result = train(model, dataclasses.replace(config, **overrides))
        score = evaluate_model(model, val, tile=64, object_class="nucleus")
        mpx = throughput(model, bench, tile=128)
        params = sum(p.numel() for p in model.parameters())
        rows.append((label, params, mpx, score.mean_iou, score.objects.f1, result["train_seconds"]))
        print(
            f"  {label}: {options} {overrides or ''} trained in {result['train_seconds']:.0f} s",
            flush=True,
        )

    print()
    print(
        f"| {'model':<22} | {'parameters':>10} | {'Mpx/s':>8} | {'mean IoU':>8} | "
        f"{'object F1':>9} | {'train s':>7} |"
    )
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for label, params, mpx, miou, f1, seconds in rows:
        # The labels' row has no model: "–" as the README writes it, not 0 and nan
        size, speed, time = (
            (f"{params:>10,}", f"{mpx:>8.3g}", f"{seconds:>7.0f}") if params else ("–", "–", "–")
        )
        print(f"| {label:<22} | {size:>10} | {speed:>8} | {miou:>8.4f} | {f1:>9.4f} | {time:>7} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
