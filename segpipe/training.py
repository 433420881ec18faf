"""Train a segmentation model on labelled images, and score it on held-out ones.

A deliberately small loop, readable top to bottom:

1. make the training and validation images that ``TrainConfig.dataset`` names: synthetic H&E
   slides (``"tissue"``) or aerial scenes (``"aerial"``) from :mod:`segpipe.synthetic`, with
   different seeds, or the (image, labels) pairs of two folders (``"folder"``,
   :func:`segpipe.datasets.read_folder`);
2. sample batches of (input window, label crop) pairs that follow the model's geometry: the
   labels are the pixels the model predicts, the input is that crop plus the model's context
   (its halo, mirrored at image borders as in the U-Net paper), see :func:`patch_pair`;
3. augment each pair, the same way on image and labels: a random elastic deformation
   (optional), a random flip and 90° rotation, an intensity jitter (optional), see
   :class:`Augmentation`;
4. minimise pixel-wise softmax cross-entropy (:func:`segpipe.losses.softmax_cross_entropy`),
   optionally weighted per pixel (balanced classes, or the U-Net border weights of
   :func:`segpipe.losses.unet_weight_map` where instance labels exist), with Adam;
5. after each epoch, predict the validation images tile by tile (the overlap-tile strategy,
   via :mod:`segpipe.tiling`), report per-class Dice and IoU from one confusion matrix
   (:mod:`segpipe.metrics`), and write a checkpoint that training can resume from.

Everything random comes from ``TrainConfig.seed``: the same config on the same machine and
thread count gives the same weights, also across an interruption and a resume.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from segpipe import metrics
from segpipe.datasets import (
    Augmentation,
    Batch,
    LabelledImage,
    as_list,
    augment,
    class_names_of,
    elastic_deformation,
    intensity_jitter,
    patch_pair,
    read_folder,
    sample_batch,
    sample_pairs,
    separate_touching,
)
from segpipe.losses import balanced_class_weights, softmax_cross_entropy, unet_weight_map
from segpipe.models.base import geometry_of
from segpipe.synthetic import AERIAL_CLASS_NAMES, CLASS_NAMES, aerial_scene, tissue_slide
from segpipe.tiling import exact_window, mirror_indices, tile_grid

if TYPE_CHECKING:
    from segpipe.models import SegmentationModel

__all__ = [
    "Augmentation",
    "Batch",
    "TrainConfig",
    "augment",
    "class_names_for",
    "elastic_deformation",
    "evaluate",
    "format_report",
    "initial_model",
    "intensity_jitter",
    "loss_weight_maps",
    "make_slides",
    "patch_pair",
    "predict_labels",
    "sample_batch",
    "sample_pairs",
    "save_trained",
    "state_path",
    "train",
]

Dataset = Literal["tissue", "aerial", "folder"]
LossWeights = Literal["none", "balanced", "unet"]

# Default pixel size of each synthetic scene, micrometres: a 20x scan, a 0.5 m orthophoto.
_DEFAULT_PIXEL_SIZE_UM = {"tissue": 0.5, "aerial": 500_000.0}


@dataclass(frozen=True)
class TrainConfig:
    """How to train, every knob with a default.

    Parameters
    ----------
    steps
        Optimiser steps (batches), over all epochs.
    batch_size
        Pairs per batch.
    patch
        Side of the label crop in pixels (the model's output); the input window is
        ``geometry.input_size(patch)`` a side, so the crop actually used may be a few pixels
        larger, ``geometry.output_size(input side)``.
    lr
        Adam learning rate (cosine decay to zero over ``steps``).
    seed
        Seeds torch and numpy; training image ``i`` is ``tissue_slide(..., seed=seed + i)``
        (or ``aerial_scene``).
    slide_size
        Side of each synthetic training image in pixels.
    num_slides
        Number of synthetic training images.
    pixel_size_um
        Micrometres per pixel of the synthetic images; None: the scene's usual one (0.5 µm
        for tissue, 500 000 µm = 0.5 m for aerial).
    val_seed
        Seed of the held-out synthetic validation image; must differ from every training one's.
    val_size
        Side of the synthetic validation image in pixels.
    val_tile
        Output tile side for validation inference (a multiple of the model's size multiple).
    log_every
        Steps between loss entries in the returned history (and progress-bar updates).
    num_threads
        torch intra-op threads; None: the CPU cores this process may use.
    progress
        Show a progress bar, and print the final report.
    dataset
        ``"tissue"`` or ``"aerial"`` (synthetic, :mod:`segpipe.synthetic`), or ``"folder"``:
        ``train_folder`` and ``val_folder``, laid out as :mod:`segpipe.datasets` describes.
    train_folder, val_folder
        Folders of (image, labels[, instances]) files, for ``dataset="folder"``.
    epochs
        Validation (and checkpoint) points: an epoch is ``ceil(steps / epochs)`` steps.
    loss_weights
        ``"none"``: plain mean cross-entropy. ``"balanced"``: each pixel weighted by its
        class's ``w_c`` (class frequencies over the training images). ``"unet"``: the U-Net
        weight map, ``w_c`` plus the border term of ``w0`` and ``sigma_px`` (needs instances).
    w0, sigma_px
        Border weight and its decay length in pixels, for ``loss_weights="unet"``.
    elastic_std_px
        Standard deviation (pixels) of the random displacements of an elastic deformation on
        a ``elastic_grid`` x ``elastic_grid`` grid, as in the U-Net paper; 0 turns it off.
    elastic_grid
        Points per side of the displacement grid (cubic interpolation between them).
    jitter
        Intensity jitter strength: contrast and brightness drawn within ``±jitter``, channel
        gains within ``±jitter / 2``; 0 turns it off.
    separate_touching
        Draw a gap between touching objects in the **training** labels
        (:func:`segpipe.datasets.separate_touching`), as the U-Net paper's annotations have,
        so that the model can learn to keep them apart; validation keeps the true labels.
    checkpoint_dir
        Where ``epoch-NNN.pt`` (:func:`segpipe.models.save`, weights-only loadable) and its
        optimiser state ``epoch-NNN.state.pt`` are written after each epoch; None: nowhere.
    resume_from
        A checkpoint written by this loop (``.../epoch-NNN.pt``): its weights, optimiser,
        schedule, random state and history are restored and training continues from there.
    """

    steps: int = 500
    batch_size: int = 8
    patch: int = 92
    lr: float = 2e-3
    seed: int = 0
    slide_size: int = 2048
    num_slides: int = 4
    pixel_size_um: float | None = None
    val_seed: int = 10_000
    val_size: int = 1024
    val_tile: int = 256
    log_every: int = 25
    num_threads: int | None = None
    progress: bool = True
    dataset: Dataset = "tissue"
    train_folder: str | None = None
    val_folder: str | None = None
    epochs: int = 1
    loss_weights: LossWeights = "none"
    w0: float = 10.0
    sigma_px: float = 5.0
    elastic_std_px: float = 0.0
    elastic_grid: int = 3
    jitter: float = 0.0
    separate_touching: bool = False
    checkpoint_dir: str | None = None
    resume_from: str | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "patch", "slide_size", "num_slides", "val_size")
        for name in (*positive, "val_tile", "log_every", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(
                f"TrainConfig.num_threads must be >= 1 or None, got {self.num_threads}"
            )
        if self.epochs > self.steps:
            raise ValueError(f"TrainConfig.epochs={self.epochs} exceeds steps={self.steps}")
        if self.dataset not in ("tissue", "aerial", "folder"):
            raise ValueError(
                f"TrainConfig.dataset must be 'tissue', 'aerial' or 'folder', got {self.dataset!r}"
            )
        if self.dataset == "folder" and not (self.train_folder and self.val_folder):
            raise ValueError(
                "TrainConfig.dataset='folder' needs train_folder and val_folder, got "
                f"{self.train_folder!r} and {self.val_folder!r}"
            )
        if self.loss_weights not in ("none", "balanced", "unet"):
            raise ValueError(
                "TrainConfig.loss_weights must be 'none', 'balanced' or 'unet', "
                f"got {self.loss_weights!r}"
            )
        if not (self.w0 >= 0 and self.sigma_px > 0):
            raise ValueError(
                f"TrainConfig needs w0 >= 0 and sigma_px > 0, got {self.w0}, {self.sigma_px}"
            )
        if not (self.elastic_std_px >= 0 and self.elastic_grid >= 2 and 0 <= self.jitter < 1):
            raise ValueError(
                "TrainConfig needs elastic_std_px >= 0, elastic_grid >= 2 and 0 <= jitter < 1, "
                f"got {self.elastic_std_px}, {self.elastic_grid}, {self.jitter}"
            )
        if self.pixel_size_um is not None and not (
            math.isfinite(self.pixel_size_um) and self.pixel_size_um > 0
        ):
            raise ValueError(f"TrainConfig.pixel_size_um must be > 0, got {self.pixel_size_um}")
        if self.dataset != "folder" and self.seed <= self.val_seed < self.seed + self.num_slides:
            raise ValueError(
                f"TrainConfig.val_seed={self.val_seed} is also a training slide's seed "
                f"(seeds {self.seed}..{self.seed + self.num_slides - 1}); the validation slide "
                "must be held out: pick another val_seed"
            )

    @property
    def train_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_slides)]

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(
            elastic_std_px=self.elastic_std_px, elastic_grid=self.elastic_grid, jitter=self.jitter
        )

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.steps / self.epochs)


def class_names_for(config: TrainConfig) -> tuple[str, ...]:
    """The class names of the data ``config`` names (a model for it needs as many classes)."""
    if config.dataset == "tissue":
        return CLASS_NAMES
    if config.dataset == "aerial":
        return AERIAL_CLASS_NAMES
    names = class_names_of(str(config.train_folder))
    return names if names is not None else read_folder(str(config.train_folder))[0].class_names


def make_slides(config: TrainConfig) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """The training images and the held-out validation images that ``config`` names."""
    if config.dataset == "folder":
        pairs = read_folder(str(config.train_folder))
        names = pairs[0].class_names
        return list(pairs), list(read_folder(str(config.val_folder), class_names=names))
    scene = tissue_slide if config.dataset == "tissue" else aerial_scene
    px = config.pixel_size_um or _DEFAULT_PIXEL_SIZE_UM[config.dataset]
    slides = [scene(config.slide_size, seed=s, pixel_size_um=px) for s in config.train_seeds]
    return list(slides), [scene(config.val_size, seed=config.val_seed, pixel_size_um=px)]


def loss_weight_maps(
    slides: Sequence[LabelledImage], config: TrainConfig
) -> list[np.ndarray] | None:
    """Per-pixel loss weights of each training image, ``(Y, X)`` float32, or None for
    ``loss_weights="none"``. ``w_c`` balances the class frequencies of all of ``slides``."""
    if config.loss_weights == "none":
        return None
    num_classes = len(slides[0].class_names)
    counts = sum(np.bincount(s.labels.ravel(), minlength=num_classes) for s in slides)
    table = balanced_class_weights(np.repeat(np.arange(num_classes), counts), num_classes)
    if config.loss_weights == "balanced":
        return [table.astype(np.float32)[s.labels] for s in slides]
    maps = []
    for i, s in enumerate(slides):
        if s.instances is None:
            raise ValueError(
                f"loss_weights='unet' needs instance labels, and training image {i} has none "
                "(add an instances/ folder, or use loss_weights='balanced')"
            )
        maps.append(
            unet_weight_map(
                s.instances,
                labels=s.labels,
                w0=config.w0,
                sigma=config.sigma_px,
                class_weights=table,
            )
        )
    return maps


def initial_model(
    name_or_checkpoint: str,
    *,
    class_names: Sequence[str],
    seed: int = 0,
    **options: Any,
) -> nn.Module:
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

    Each output tile is predicted from its :func:`segpipe.tiling.exact_window` (mirrored at the
    borders), so for a valid-padding model the result equals one pass over the whole mirrored
    image. The model is used as it is (call ``model.eval()`` first for inference behaviour).
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
        x = torch.from_numpy(batch).float().div_(255)
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


def state_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The optimiser state written beside a training checkpoint: ``x.pt`` -> ``x.state.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".pt") + ".state.pt")


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
    :func:`segpipe.losses.softmax_cross_entropy`; the notes' image loss is the sum, which
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
        state = _load_state(config.resume_from, model, optimiser, schedule, rng)
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
                checkpoint = _save_state(
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


def _save_state(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    config: TrainConfig,
    step: int,
    seconds: float,
    history: list[float],
    window_losses: list[float],
    epochs: list[dict[str, Any]],
) -> Path:
    """``epoch-NNN.pt`` (the model, :func:`segpipe.models.save`) and ``epoch-NNN.state.pt``
    (everything else a resume needs; tensors and plain data, so weights-only loadable)."""
    from segpipe import models

    if not isinstance(model, models.SegmentationModel):
        raise TypeError(
            f"checkpoints need a segpipe model (segpipe.models.build), got {type(model).__name__}"
        )
    path = Path(str(config.checkpoint_dir)) / f"epoch-{len(epochs):03d}.pt"
    models.save(model, path, metrics={**epochs[-1], "config": asdict(config)})
    torch.save(
        {
            "step": step,
            "optimizer": optimiser.state_dict(),
            "scheduler": schedule.state_dict(),
            # PCG64's state holds 128-bit integers: kept as JSON text.
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "train_seconds": seconds,
            "loss_history": list(history),
            "window_losses": list(window_losses),
            "epochs": json.dumps(epochs),
        },
        state_path(path),
    )
    return path


def _load_state(
    checkpoint: str,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
) -> dict[str, Any]:
    from segpipe import models

    state_file = state_path(checkpoint)
    if not state_file.is_file():
        raise FileNotFoundError(
            f"cannot resume from {checkpoint}: its optimiser state {state_file} is missing "
            "(resume needs a checkpoint written by segpipe.training.train)"
        )
    model.load_state_dict(models.load(checkpoint).state_dict(), strict=True)
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    optimiser.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    return {**state, "epochs": json.loads(state["epochs"])}
