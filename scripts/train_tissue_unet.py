"""Reproduce segpipe's shipped tissue model, ``segpipe/models/weights/tissue-unet.pt``.

    python scripts/train_tissue_unet.py

Trains a valid-padding U-Net (depth 3, width 16) on synthetic H&E slides with fixed seeds,
scores it on a held-out synthetic slide (another seed), and saves it in float16 with those
scores. The scores stored (and printed) are those of the saved float16 weights, re-evaluated
after loading, so the file's metrics describe exactly what ships. About 10 minutes on 2 CPU
cores; with the same torch build, thread count and CPU instruction set (AVX2, AVX-512: all
three recorded in the file's metrics) the weights come out the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segpipe import models
from segpipe.analysis.evaluation import Evaluation, evaluate_model
from segpipe.synthetic import CLASS_NAMES, tissue_slide
from segpipe.training import TrainConfig, train

OUTPUT = Path(__file__).resolve().parents[1] / "segpipe" / "models" / "weights" / "tissue-unet.pt"

MODEL = dict(in_channels=3, width=16, depth=3, padding="valid", dropout=0.1)
CONFIG = TrainConfig(
    steps=600,
    batch_size=8,
    patch=92,
    lr=2e-3,
    seed=0,
    slide_size=2048,
    num_slides=4,
    pixel_size_um=0.5,
    val_seed=10_000,
    val_size=2048,
    val_tile=256,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default {OUTPUT}")
    parser.add_argument(
        "--steps", type=int, default=CONFIG.steps, help="override for a quick trial run"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    config = dataclasses.replace(CONFIG, steps=args.steps, progress=not args.no_progress)

    start = time.perf_counter()
    torch.manual_seed(config.seed)  # the initial weights; train() seeds the rest
    model = models.build("unet", class_names=CLASS_NAMES, **MODEL)
    result = train(model, config)
    print(f"trained {config.steps} steps in {result['train_seconds']:.0f} s")
    _print_scores("float32 weights", Evaluation.from_dict(result))

    # No pixel contract, as before contracts existed: with one (0.5 µm) a 40x slide whose
    # pyramid steps 4x (0.25, 1 µm) has no level within 25% and would be refused; the shipped
    # models segment any slide as they always did (README: "Segment your own slides").
    model.pixel_contract = None
    # Score what actually ships: the float16 weights, as load() gives them back.
    models.save(model, args.output, half=True)
    shipped = models.load(args.output)
    val_slide = tissue_slide(
        config.val_size, seed=config.val_seed, pixel_size_um=config.pixel_size_um
    )
    scores = evaluate_model(shipped, val_slide, tile=config.val_tile)
    elapsed = time.perf_counter() - start
    metrics = {
        **scores.as_dict(),
        "validation": {
            "slide": "segpipe.synthetic.tissue_slide",
            "seed": config.val_seed,
            "size_px": config.val_size,
            "pixel_size_um": config.pixel_size_um,
        },
        "train_seeds": config.train_seeds,
        "loss_history": result["loss_history"],
        "final_loss": result["final_loss"],
        "train_seconds": result["train_seconds"],
        "total_seconds": round(elapsed, 1),
        "train_config": result["config"],
        "command": "python scripts/train_tissue_unet.py",
        "torch": torch.__version__,
        "numpy": np.__version__,
        # What training ran with: train() has put the caller's thread count back by now.
        "threads": result["threads"],
        # AVX2 and AVX-512 kernels round differently: the weights reproduce on the same one.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }
    models.save(shipped, args.output, metrics=metrics, half=True)
    _print_scores("saved float16 weights", scores)
    size_mb = args.output.stat().st_size / 1e6
    print(f"wrote {args.output} ({size_mb:.2f} MB) in {elapsed:.0f} s total")
    return 0


def _print_scores(what: str, scores: Evaluation) -> None:
    dice = "  ".join(f"{k} {v:.4f}" for k, v in scores.dice.items())
    iou = "  ".join(f"{k} {v:.4f}" for k, v in scores.iou.items())
    print(f"validation Dice ({what}): {dice}  | mean tissue+nucleus {scores.mean_dice:.4f}")
    print(f"validation IoU  ({what}): {iou}")


if __name__ == "__main__":
    sys.exit(main())
