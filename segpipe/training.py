"""Train a segmentation model on synthetic slides, and score it on a held-out one.

A deliberately small loop, readable top to bottom:

1. generate ``num_slides`` training slides and one validation slide (:mod:`segpipe.synthetic`,
   different seeds);
2. sample batches of (input window, label crop) pairs that follow the model's geometry: the
   labels are the pixels the model predicts, the input is that crop plus the model's context
   (its halo, mirrored at slide borders as in the U-Net paper), see :func:`patch_pair`;
3. augment each pair with a random flip and 90° rotation, the same on image and labels;
4. minimise pixel-wise softmax cross-entropy with Adam;
5. predict the whole validation slide tile by tile (the overlap-tile strategy, via
   :mod:`segpipe.tiling`) and report per-class Dice and IoU from one confusion matrix
   (:mod:`segpipe.metrics`).

Everything random comes from ``TrainConfig.seed``: the same config on the same machine and
thread count gives the same weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from segpipe import metrics
from segpipe.models.base import geometry_of
from segpipe.synthetic import SyntheticSlide, tissue_slide
from segpipe.tiling import Geometry, exact_window, mirror_indices, tile_grid

__all__ = [
    "TrainConfig",
    "augment",
    "evaluate",
    "make_slides",
    "patch_pair",
    "predict_labels",
    "sample_batch",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """How to train, every knob with a default.

    Parameters
    ----------
    steps
        Optimiser steps (batches).
    batch_size
        Pairs per batch.
    patch
        Side of the label crop in pixels (the model's output); the input window is
        ``geometry.input_size(patch)`` a side, so the crop actually used may be a few pixels
        larger, ``geometry.output_size(input side)``.
    lr
        Adam learning rate.
    seed
        Seeds torch and numpy; training slide ``i`` is ``tissue_slide(..., seed=seed + i)``.
    slide_size
        Side of each training slide in pixels.
    num_slides
        Number of training slides.
    pixel_size_um
        Micrometres per pixel of the generated slides.
    val_seed
        Seed of the held-out validation slide; must differ from every training slide's.
    val_size
        Side of the validation slide in pixels.
    val_tile
        Output tile side for validation inference (a multiple of the model's size multiple).
    log_every
        Steps between loss entries in the returned history (and progress-bar updates).
    num_threads
        torch intra-op threads; None: the CPU cores this process may use.
    progress
        Show a tqdm progress bar.
    """

    steps: int = 500
    batch_size: int = 8
    patch: int = 92
    lr: float = 2e-3
    seed: int = 0
    slide_size: int = 2048
    num_slides: int = 4
    pixel_size_um: float = 0.5
    val_seed: int = 10_000
    val_size: int = 1024
    val_tile: int = 256
    log_every: int = 25
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "patch", "slide_size", "num_slides", "val_size")
        for name in (*positive, "val_tile", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(
                f"TrainConfig.num_threads must be >= 1 or None, got {self.num_threads}"
            )
        if self.seed <= self.val_seed < self.seed + self.num_slides:
            raise ValueError(
                f"TrainConfig.val_seed={self.val_seed} is also a training slide's seed "
                f"(seeds {self.seed}..{self.seed + self.num_slides - 1}); the validation slide "
                "must be held out: pick another val_seed"
            )

    @property
    def train_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_slides)]


def make_slides(config: TrainConfig) -> tuple[list[SyntheticSlide], SyntheticSlide]:
    """The training slides and the held-out validation slide that ``config`` names."""
    train_slides = [
        tissue_slide(config.slide_size, seed=s, pixel_size_um=config.pixel_size_um)
        for s in config.train_seeds
    ]
    val = tissue_slide(config.val_size, seed=config.val_seed, pixel_size_um=config.pixel_size_um)
    return train_slides, val


def _window_sides(geometry: Geometry, patch: int) -> tuple[int, int]:
    """(input side, label side) in pixels for a requested label side of ``patch``."""
    n = geometry.input_size(patch)
    return n, geometry.output_size(n)


def patch_pair(
    slide: SyntheticSlide, y: int, x: int, geometry: Geometry, patch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One training pair whose label crop has its top-left corner at ``(y, x)``.

    The input window is the label crop grown by the model's context, centred on it::

        input window, n = geometry.input_size(patch) a side
        +----------------------+
        |  (n - o) / 2         |      mirrored where it leaves the slide
        |   +--------------+   |
        |   | labels, o a  |   |      o = geometry.output_size(n) >= patch
        |   | side         |   |
        |   +--------------+   |
        +----------------------+

    Parameters
    ----------
    slide
        Source of image and labels.
    y, x
        Top-left of the label crop in slide pixels; the crop may run past the slide's
        bottom/right edge, where it is mirrored like the context.
    geometry, patch
        The model's geometry and the requested label side (pixels).

    Returns
    -------
    image
        ``(3, n, n)`` float32 in ``[0, 1]``.
    labels
        ``(o, o)`` int64 class ids.
    """
    n, o = _window_sides(geometry, patch)
    margin = (n - o) // 2  # the halo for valid convolutions, 0 for same padding
    ny, nx = slide.shape
    rows = mirror_indices(y - margin, y - margin + n, ny)
    cols = mirror_indices(x - margin, x - margin + n, nx)
    image = slide.image[np.ix_(rows, cols)]  # (n, n, 3) uint8
    image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
    labels = slide.labels[np.ix_(rows[margin : margin + o], cols[margin : margin + o])]
    return image, labels.astype(np.int64)


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random one of the 8 flips/rotations of the square, the same on image and labels.

    ``image`` is ``(C, n, n)``, ``labels`` ``(o, o)`` centred in it; both turn about their
    centres, so they stay aligned. Returns contiguous copies.
    """
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    image = np.rot90(image, k, axes=(-2, -1))
    labels = np.rot90(labels, k, axes=(-2, -1))
    if flip:
        image, labels = image[..., ::-1], labels[..., ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def sample_batch(
    slides: Sequence[SyntheticSlide],
    geometry: Geometry,
    patch: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    is_augmented: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of pairs at uniformly random positions of randomly chosen slides, each pair
    flipped and rotated at random unless ``is_augmented`` is False.

    Returns ``(batch_size, 3, n, n)`` float32 images and ``(batch_size, o, o)`` int64 labels,
    ``n`` and ``o`` as in :func:`patch_pair`.
    """
    o = _window_sides(geometry, patch)[1]
    images, labels = [], []
    for _ in range(batch_size):
        slide = slides[int(rng.integers(len(slides)))]
        # Label crops inside the slide (true labels only); the context is mirrored at the
        # borders as it is at inference. A slide smaller than a crop gets mirrored labels too.
        y = int(rng.integers(max(slide.shape[0] - o, 0) + 1))
        x = int(rng.integers(max(slide.shape[1] - o, 0) + 1))
        image, label = patch_pair(slide, y, x, geometry, patch)
        if is_augmented:
            image, label = augment(image, label, rng)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


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
    model: nn.Module, slide: SyntheticSlide, *, tile: int = 256, batch_size: int = 4
) -> dict[str, Any]:
    """Per-class Dice and IoU of ``model`` on a whole slide, in eval mode.

    Returns plain data (it goes into checkpoints): ``{"dice": {class: value}, "iou": {...},
    "mean_dice": ..., "confusion": C x C list}``, where ``mean_dice`` averages the classes
    other than the first (background), which would otherwise flatter a mostly empty slide.
    NaN marks a class absent from both truth and prediction.
    """
    was_training = model.training
    model.eval()
    try:
        pred = predict_labels(model, slide.image, tile=tile, batch_size=batch_size)
    finally:
        model.train(was_training)
    names = list(slide.class_names)
    cm = metrics.confusion_matrix(pred, slide.labels, len(names))
    return {
        "dice": dict(zip(names, metrics.dice(cm).tolist(), strict=True)),
        "iou": dict(zip(names, metrics.iou(cm).tolist(), strict=True)),
        "mean_dice": metrics.mean_dice(cm, classes=range(1, len(names))),
        "confusion": cm.tolist(),
    }


def train(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Train ``model`` in place on synthetic slides; return its validation metrics.

    The loss is pixel-wise softmax cross-entropy, ``-log P_truth(i, j)``, **averaged** over
    all pixels of the batch (``F.cross_entropy`` with mean reduction; the notes' image loss is
    the sum, which differs only by a constant factor the learning rate absorbs).

    Seeds torch and numpy from ``config.seed`` for sampling, augmentation and dropout; the
    initial weights were drawn when the model was built, so seed torch before building it
    (``torch.manual_seed(config.seed)``) for a run that reproduces bit for bit.

    Returns
    -------
    dict
        What :func:`evaluate` returns on the validation slide, plus ``"loss_history"`` (mean
        loss per ``log_every`` steps), ``"final_loss"``, ``"train_seconds"``, ``"config"``.
        Plain data, ready for ``segpipe.models.save(..., metrics=...)``.
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
    train_slides, val_slide = make_slides(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    # Cosine decay to zero: large steps early, fine boundaries at the end.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)

    model.train()
    history: list[float] = []
    window_losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train", disable=not config.progress, unit="step")
    for step in bar:
        images, labels = sample_batch(train_slides, geometry, config.patch, config.batch_size, rng)
        logits = model(torch.from_numpy(images))
        loss = F.cross_entropy(logits, torch.from_numpy(labels))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        window_losses.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append(float(np.mean(window_losses)))
            window_losses.clear()
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    train_seconds = time.perf_counter() - start

    result = evaluate(model, val_slide, tile=config.val_tile)
    model.eval()
    result.update(
        loss_history=history,
        final_loss=history[-1],
        train_seconds=round(train_seconds, 1),
        config=asdict(config),
    )
    return result
