"""The training loop: initial model, epochs with validation and checkpoints, save_trained."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from segpipe.analysis import metrics
from segpipe.geometry.pixels import to_float01
from segpipe.geometry.tiling import exact_window, mirror_indices, tile_grid
from segpipe.models.base import geometry_of
from segpipe.training.config import TrainConfig, loss_weight_maps, make_slides
from segpipe.training.datasets import (
    LabelledImage,
    as_list,
    sample_pairs,
    separate_touching,
)
from segpipe.training.losses import softmax_cross_entropy
from segpipe.training.state import load_state, save_state

if TYPE_CHECKING:
    from segpipe.models import SegmentationModel

__all__ = ["evaluate", "format_report", "initial_model", "predict_labels", "save_trained", "train"]


def initial_model(
    name_or_checkpoint: str,
    *,
    class_names: Sequence[str],
    seed: int = 0,
    **options: Any,
) -> SegmentationModel:
    """The model training starts from: a fresh ``segpipe.models.build(name, ...)`` with torch
    seeded by ``seed`` (reproducible initial weights), or a checkpoint/shipped model to
    fine-tune (``options`` must then be empty)."""
    from segpipe import models

    if name_or_checkpoint in models.available():
        torch.manual_seed(seed)
        return models.build(name_or_checkpoint, class_names=class_names, **options)
    if options:
        raise ValueError(
            f"{name_or_checkpoint!r} is a trained model; its architecture is fixed, so the "
            f"options {sorted(options)} cannot apply"
        )
    model = models.load(name_or_checkpoint)
    if tuple(model.class_names) != tuple(class_names):
        raise ValueError(
            f"{name_or_checkpoint} predicts {model.class_names}, the data has {tuple(class_names)}"
        )
    return model


@torch.inference_mode()
def predict_labels(
    model: nn.Module, image: np.ndarray, *, tile: int = 256, batch_size: int = 4
) -> np.ndarray:
    """Class map ``(Y, X)`` uint8 of a whole ``(Y, X, 3)`` uint8 image, tile by tile.

    Each output tile is predicted from its :func:`segpipe.geometry.tiling.exact_window`
    (mirrored at the borders), so for a valid-padding model the result equals one pass over
    the whole mirrored image. The model is used as it is (call ``model.eval()`` first for
    inference behaviour).
    """
    geometry = geometry_of(model)
    shape = (int(image.shape[0]), int(image.shape[1]))
    grid = tile_grid(shape, tile)
    out = np.empty(shape, dtype=np.uint8)
    tiles = list(grid)
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        windows = [exact_window(t, tile, geometry) for t in chunk]
        batch = np.stack(
            [
                image[
                    np.ix_(
                        mirror_indices(w.input.y0, w.input.y1, shape[0]),
                        mirror_indices(w.input.x0, w.input.x1, shape[1]),
                    )
                ].transpose(2, 0, 1)
                for w in windows
            ]
        )
        x = torch.from_numpy(to_float01(batch))
        pred = model(x).argmax(dim=1).to(torch.uint8).numpy()
        for t, w, p in zip(chunk, windows, pred, strict=True):
            h, wd = t.box.shape
            out[t.box.slices] = p[w.crop : w.crop + h, w.crop : w.crop + wd]
    return out


def evaluate(
    model: nn.Module,
    slides: LabelledImage | Sequence[LabelledImage],
    *,
    tile: int = 256,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Per-class Dice and IoU of ``model`` on whole images, in eval mode.

    Several images are scored together: their confusion matrices add up. Returns plain data
    (it goes into checkpoints): ``{"dice": {class: value}, "iou": {...}, "mean_dice": ...,
    "mean_iou": ..., "confusion": C x C list}``, where the means average the classes other
    than the first (background), which would otherwise flatter a mostly empty slide.
    NaN marks a class absent from both truth and prediction.
    """
    items = as_list(slides)
    names = list(items[0].class_names)
    was_training = model.training
    model.eval()
    cm = np.zeros((len(names), len(names)), dtype=np.int64)
    try:
        for slide in items:
            pred = predict_labels(model, slide.image, tile=tile, batch_size=batch_size)
            cm += metrics.confusion_matrix(pred, slide.labels, len(names))
    finally:
        model.train(was_training)
    foreground = range(1, len(names))
    iou = metrics.iou(cm)
    return {
        "dice": dict(zip(names, metrics.dice(cm).tolist(), strict=True)),
        "iou": dict(zip(names, iou.tolist(), strict=True)),
        "mean_dice": metrics.mean_dice(cm, classes=foreground),
        "mean_iou": float(np.nanmean(iou[1:])) if np.isfinite(iou[1:]).any() else float("nan"),
        "confusion": cm.tolist(),
    }


def format_report(result: dict[str, Any]) -> str:
    """The final metrics of :func:`train` as a small text table."""
    lines = [f"{'class':<14}{'Dice':>8}{'IoU':>8}"]
    for name, d in result["dice"].items():
        lines.append(f"{name:<14}{d:>8.4f}{result['iou'][name]:>8.4f}")
    lines.append(f"{'mean (no bg)':<14}{result['mean_dice']:>8.4f}{result['mean_iou']:>8.4f}")
    for e in result.get("epochs", []):
        lines.append(
            f"epoch {e['epoch']:>3}  step {e['step']:>6}  loss {e['loss']:.4f}  "
            f"mean Dice {e['mean_dice']:.4f}  mean IoU {e['mean_iou']:.4f}"
        )
    lines.append(f"trained in {result['train_seconds']:.1f} s")
    return "\n".join(lines)


def train(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Train ``model`` in place; return its validation metrics.

    The loss is pixel-wise softmax cross-entropy, ``-log P_truth(i, j)``, **averaged** over
    all pixels of the batch (weighted mean ``sum(w L) / sum(w)`` with loss weights; see
    :func:`segpipe.training.losses.softmax_cross_entropy`; the notes' image loss is the sum, which
    differs only by a constant factor the learning rate absorbs).

    Seeds torch and numpy from ``config.seed`` for sampling, augmentation and dropout; the
    initial weights were drawn when the model was built, so seed torch before building it
    (``torch.manual_seed(config.seed)``, or :func:`initial_model`) for a run that reproduces
    bit for bit. A run resumed from one of its checkpoints ends with the same weights as an
    uninterrupted one.

    Returns
    -------
    dict
        What :func:`evaluate` returns on the validation images after the last epoch, plus
        ``"epochs"`` (per epoch: step, mean loss, Dice, IoU), ``"loss_history"`` (mean loss
        per ``log_every`` steps), ``"final_loss"``, ``"train_seconds"``, ``"config"``,
        ``"checkpoint"`` (the last one written, or None). Plain data, ready for
        ``segpipe.models.save(..., metrics=...)``.
    """
    threads = config.num_threads or len(os.sched_getaffinity(0))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(model, config)
    finally:
        torch.set_num_threads(previous_threads)


def _train(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    geometry = geometry_of(model)
    train_slides, val_slides = make_slides(config)
    if config.separate_touching:
        train_slides = [separate_touching(s) for s in train_slides]
    names = tuple(train_slides[0].class_names)
    classes = getattr(model, "num_classes", len(names))
    if classes != len(names):
        raise ValueError(
            f"the model predicts {classes} classes, the {config.dataset} data has "
            f"{len(names)}: {names}; build it with class_names={names}"
        )
    weight_maps = loss_weight_maps(train_slides, config)
    augmentation = config.augmentation
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    # Cosine decay to zero: large steps early, fine boundaries at the end.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)

    history: list[float] = []
    window_losses: list[float] = []
    epochs: list[dict[str, Any]] = []
    first_step, seconds_before = 0, 0.0
    if config.resume_from:
        state = load_state(config.resume_from, model, optimiser, schedule, rng)
        first_step, seconds_before = state["step"], state["train_seconds"]
        history, window_losses, epochs = (
            state["loss_history"],
            state["window_losses"],
            state["epochs"],
        )

    model.train()
    start = time.perf_counter()
    checkpoint: Path | None = None
    result: dict[str, Any] = {}
    epoch_losses: list[float] = []
    bar = tqdm(
        range(first_step, config.steps),
        desc="train",
        disable=not config.progress,
        unit="step",
        initial=first_step,
        total=config.steps,
    )
    for step in bar:
        batch = sample_pairs(
            train_slides,
            geometry,
            config.patch,
            config.batch_size,
            rng,
            augmentation=augmentation,
            weight_maps=weight_maps,
        )
        logits = model(torch.from_numpy(batch.images))
        weights = None if batch.weights is None else torch.from_numpy(batch.weights)
        loss = softmax_cross_entropy(logits, torch.from_numpy(batch.labels), weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        window_losses.append(loss.item())
        epoch_losses.append(window_losses[-1])
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append(float(np.mean(window_losses)))
            window_losses.clear()
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        if (step + 1) % config.steps_per_epoch == 0 or step + 1 == config.steps:
            result = evaluate(model, val_slides, tile=config.val_tile)
            epochs.append(
                {
                    "epoch": len(epochs) + 1,
                    "step": step + 1,
                    "loss": float(np.mean(epoch_losses)),
                    "mean_dice": result["mean_dice"],
                    "mean_iou": result["mean_iou"],
                    "dice": result["dice"],
                    "iou": result["iou"],
                }
            )
            epoch_losses.clear()
            seconds = seconds_before + time.perf_counter() - start
            if config.checkpoint_dir:
                checkpoint = save_state(
                    model,
                    optimiser,
                    schedule,
                    rng,
                    config,
                    step + 1,
                    seconds,
                    history,
                    window_losses,
                    epochs,
                )
    train_seconds = seconds_before + time.perf_counter() - start

    model.eval()
    result.update(
        epochs=epochs,
        loss_history=history,
        final_loss=history[-1],
        train_seconds=round(train_seconds, 1),
        config=asdict(config),
        checkpoint=None if checkpoint is None else str(checkpoint),
    )
    if config.progress:
        print(format_report(result))
    return result


def save_trained(
    model: SegmentationModel,
    config: TrainConfig,
    result: dict[str, Any],
    output: str | os.PathLike[str],
    *,
    half: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save a model :func:`train` trained, with the scores of **what was saved**.

    With ``half=True`` the float16 weights are loaded back and evaluated again on the
    validation images, so the file's metrics describe exactly what ships. The metrics hold
    those scores, the validation data, the loss history, the training config and ``extra``
    (e.g. the command that reproduces the file). Returns the metrics saved.
    """
    import platform

    from segpipe import models

    models.save(model, output, half=half)
    saved = models.load(output)
    val = make_slides(config)[1]
    scores = evaluate(saved, val, tile=config.val_tile)
    data: dict[str, Any] = {"dataset": config.dataset, "train_seeds": config.train_seeds}
    if config.dataset == "folder":
        data = {"dataset": "folder", "train": config.train_folder, "val": config.val_folder}
    else:
        data.update(val_seed=config.val_seed, val_size_px=config.val_size)
    saved_metrics = {
        **scores,
        "validation": data,
        "loss_history": result["loss_history"],
        "final_loss": result["final_loss"],
        "epochs": result.get("epochs", []),
        "train_seconds": result["train_seconds"],
        "train_config": asdict(config),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        **(extra or {}),
    }
    models.save(saved, output, metrics=saved_metrics, half=half)
    return saved_metrics
