"""What to train on and how: :class:`TrainConfig`, every knob with a default, and the data it names.

:func:`make_slides` makes the training and held-out validation images a config names (synthetic
scenes, or two folders' pairs), :func:`class_names_for` their classes, :func:`pixel_contract_for`
what their pixels are (channels, dtype, scaling, pixel size: the model records it) and
:func:`loss_weight_maps` the loss weights. :mod:`segpipe.training` re-exports them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from torch import nn

from segpipe.analysis.evaluation import LabelledImage
from segpipe.models.contract import PixelContract, measure_contract, sampled_pixels
from segpipe.synthetic import AERIAL_CLASS_NAMES, CLASS_NAMES, aerial_scene, tissue_slide
from segpipe.training.augmentation import Augmentation
from segpipe.training.datasets import (
    check_held_out,
    class_names_of,
    common_pixel_size,
    pixel_kind,
    read_folder,
    warn_mixed_pixel_sizes,
)
from segpipe.training.losses import counted_class_weights, unet_weight_map

__all__ = [
    "TrainConfig",
    "class_names_for",
    "loss_weight_maps",
    "make_slides",
    "pixel_contract_for",
    "training_contract",
]

Dataset = Literal["tissue", "aerial", "folder"]
LossWeights = Literal["none", "balanced", "unet"]
Scaling = Literal["auto", "dtype", "range", "percentile"]

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
        Side of the label crop asked for, in pixels; the input window is
        ``geometry.input_size(patch)`` a side and the labels are
        ``geometry.output_size(input side)``: for a valid-padding model the crop, a few pixels
        larger than ``patch``; for a same-padding model the whole window, ``patch`` plus twice
        the halo, rounded up to the size rule (:mod:`segpipe.training.sampling` says why).
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
        for tissue, 500 000 µm = 0.5 m for aerial). For folder data it overrides what the
        files say (the model records it; inference matches levels to it).
    scaling
        How pixel values become the model's ``[0, 1]`` input, recorded in the model's pixel
        contract and applied identically at inference: ``"auto"`` (the dtype's range for
        uint8 and for floats within [0, 1], else ``"percentile"``), ``"dtype"`` (divide by
        the dtype's maximum), ``"range"`` (``value_range`` onto 0..1, e.g. ``(0, 4095)`` for
        a 12-bit camera) or ``"percentile"`` (``percentiles`` of the training pixels, per
        channel, onto 0..1).
    value_range, percentiles
        For ``scaling="range"`` and ``"percentile"``.
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
        ``train_folder`` and ``val_folder``, laid out as :mod:`segpipe.training.datasets` describes.
    train_folder, val_folder
        Folders of (image, labels[, instances]) files, for ``dataset="folder"`` (and only for
        it: refused with another dataset); their images share one dtype and channel count.
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
        Intensity jitter strength: contrast within ``±jitter``, brightness and channel gains
        within ``±jitter / 2``, on the scaled pixels, clipped to the scaled range of their
        dtype (:func:`segpipe.training.augmentation.scaled_dtype_range`); 0 turns it off.
    separate_touching
        Draw a gap between touching objects in the **training** labels
        (:func:`segpipe.training.datasets.separate_touching`), as the U-Net paper's annotations
        have, so that the model can learn to keep them apart; validation keeps the labels.
    checkpoint_dir
        Where ``epoch-NNN.pt`` (:func:`segpipe.models.save`, weights-only loadable) and its
        optimiser state ``epoch-NNN.state.pt`` are written after each epoch; None: nowhere.
    resume_from
        A checkpoint written by this loop (``.../epoch-NNN.pt``): its weights, optimiser,
        schedule, random state and history are restored and training continues from there.
        Every other setting must be the checkpoint's run's, but for those in
        :data:`segpipe.training.state.RESUME_MAY_CHANGE` (where and how it runs).
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
    scaling: Scaling = "auto"
    value_range: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "patch", "slide_size", "num_slides", "val_size")
        for name in (*positive, "val_tile", "log_every", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"TrainConfig.num_threads must be >= 1 or None: {self.num_threads}")
        if min(self.seed, self.val_seed) < 0:  # numpy's message named neither (--seed -1)
            raise ValueError(f"TrainConfig.seed and val_seed must be >= 0, got "
                             f"{self.seed}, {self.val_seed}")  # fmt: skip
        per, n, steps = self.steps_per_epoch, self.epochs, self.steps
        if n > steps or math.ceil(steps / per) != n:
            # Epochs of ceil(steps / epochs) steps can end early (10 steps in epochs of 2 make
            # 5, not 6): refused rather than re-spaced, so every valid run trains as it did.
            fits = [e for e in range(1, steps + 1) if math.ceil(steps / e) * (e - 1) < steps]
            near = [*[e for e in fits if e < n][-1:], *[e for e in fits if e > n][:1]]
            raise ValueError(
                f"TrainConfig.epochs={n} with steps={steps} makes {math.ceil(steps / per)} "
                f"epochs of ceil(steps / epochs) = {per} steps; ask for epochs="
                f"{' or '.join(map(str, near))}, or steps={n * per}"
            )
        if self.dataset not in ("tissue", "aerial", "folder"):
            raise ValueError(
                f"TrainConfig.dataset must be 'tissue', 'aerial' or 'folder', got {self.dataset!r}"
            )
        if self.dataset == "folder":
            if not (self.train_folder and self.val_folder):
                raise ValueError(
                    "TrainConfig.dataset='folder' needs train_folder and val_folder, got "
                    f"{self.train_folder!r} and {self.val_folder!r}"
                )
            if Path(self.val_folder).resolve() == Path(self.train_folder).resolve():
                raise ValueError(
                    f"TrainConfig.val_folder {self.val_folder!r} is the training folder "
                    f"{self.train_folder!r}: validation images must be held out, or the "
                    "validation scores are those of images the model was trained on; give a "
                    "folder of other images"
                )
        elif self.train_folder or self.val_folder:
            raise ValueError(
                f"TrainConfig.train_folder={self.train_folder!r} and val_folder="
                f"{self.val_folder!r} are read only with dataset='folder', not "
                f"{self.dataset!r}: set dataset='folder', or leave them out to train on "
                "synthetic scenes"
            )
        if self.loss_weights not in ("none", "balanced", "unet"):
            raise ValueError(
                "TrainConfig.loss_weights must be 'none', 'balanced' or 'unet', "
                f"got {self.loss_weights!r}"
            )
        # Finite: an infinite w0 or sigma_px failed deep in the weight map, and an infinite
        # displacement made every training pair zeros.
        if not (0 <= self.w0 < math.inf and 0 < self.sigma_px < math.inf):
            raise ValueError(f"TrainConfig.w0 must be finite and >= 0 and TrainConfig.sigma_px "
                             f"finite and > 0, got {self.w0}, {self.sigma_px}")  # fmt: skip
        if not (0 <= self.elastic_std_px <= self.patch and self.elastic_grid >= 2
                and 0 <= self.jitter < 1):  # fmt: skip
            raise ValueError(
                "TrainConfig.elastic_std_px must be in [0, TrainConfig.patch], TrainConfig.jitter "
                f"in [0, 1) and elastic_grid >= 2, got {self.elastic_std_px} (patch {self.patch}), "
                f"{self.elastic_grid}, {self.jitter}"
            )
        if self.pixel_size_um is not None and not 0 < self.pixel_size_um < math.inf:
            raise ValueError(f"TrainConfig.pixel_size_um must be > 0, got {self.pixel_size_um}")
        if self.scaling not in (scalings := ("auto", "dtype", "range", "percentile")):
            raise ValueError(f"TrainConfig.scaling must be one of {scalings}, got {self.scaling!r}")
        if self.scaling == "range" and (
            self.value_range is None
            or len(self.value_range) != 2
            or not self.value_range[1] > self.value_range[0]
        ):
            raise ValueError(
                "TrainConfig.scaling='range' needs value_range=(lo, hi) with hi > lo, got "
                f"{self.value_range!r}"
            )
        lo_p, hi_p = self.percentiles
        if not 0 <= lo_p < hi_p <= 100:
            raise ValueError(
                f"TrainConfig.percentiles must be (lo, hi) with 0 <= lo < hi <= 100, got "
                f"{self.percentiles!r}"
            )
        if self.dataset != "folder" and self.seed <= self.val_seed < self.seed + self.num_slides:
            raise ValueError(
                f"TrainConfig.val_seed={self.val_seed} is also a training slide's seed "
                f"(seeds {self.seed}..{self.seed + self.num_slides - 1}); the validation slide "
                "must be held out: pick another seed (--seed) or val_seed"
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


def pixel_contract_for(
    config: TrainConfig, slides: Sequence[LabelledImage] | None = None
) -> PixelContract:
    """What the training pixels of ``config`` are: channels, dtype, scaling, pixel size, and
    (from ``slides``, the training images, when given) their statistics.

    Folder data is read when ``slides`` is not given; synthetic scenes are described
    without being generated (uint8 RGB at the config's pixel size, dtype scaling).
    """
    if slides is None and config.dataset != "folder":
        return PixelContract(
            channels=3,
            channel_names=("red", "green", "blue"),
            dtype="uint8",
            pixel_size_um=config.pixel_size_um or _DEFAULT_PIXEL_SIZE_UM[config.dataset],
        )
    slides = read_folder(str(config.train_folder)) if slides is None else slides
    pixel_size = config.pixel_size_um or _DEFAULT_PIXEL_SIZE_UM.get(config.dataset)
    pixel_size = pixel_size or common_pixel_size(slides)
    contract = measure_contract(
        [np.asarray(s.image) for s in slides],
        scaling=config.scaling,
        value_range=config.value_range,
        percentiles=config.percentiles,
        pixel_size_um=pixel_size,
    )
    if contract.channels == 3 and contract.dtype == "uint8":
        contract = replace(contract, channel_names=("red", "green", "blue"))
    return contract


def training_contract(
    model: nn.Module, config: TrainConfig, slides: Sequence[LabelledImage]
) -> PixelContract:
    """The contract training applies, set as ``model.pixel_contract`` (so it is saved).

    The model's own scaling when it has a contract (fine-tuning, or
    :func:`~segpipe.training.initial_model` given the data's contract), with the statistics
    of these training images; else the one measured on them (:func:`pixel_contract_for`).
    Its pixel size is ``config.pixel_size_um``, else the images' common one, else the model's.
    Raises ValueError when the model's channels or fixed value range do not fit the images.
    """
    own = getattr(model, "pixel_contract", None)
    size = config.pixel_size_um or common_pixel_size(slides) or getattr(own, "pixel_size_um", None)
    measured = pixel_contract_for(replace(config, pixel_size_um=size), slides)
    channels = getattr(model, "in_channels", measured.channels)
    if channels != measured.channels:
        raise ValueError(
            f"the model takes {channels} channel(s), the {config.dataset} training images have "
            f"{measured.channels} ({measured.dtype}); build it with "
            f"in_channels={measured.channels} (segpipe.training.initial_model(..., "
            "contract=segpipe.training.pixel_contract_for(config)) does)"
        )
    contract = measured
    if isinstance(own, PixelContract):
        if own.scaling != "dtype" and own.dtype not in (None, measured.dtype):
            raise ValueError(
                f"the model was trained on {own.dtype} pixels scaled {own.describe_scaling()}, "
                f"the training images are {measured.dtype}: convert them, or train a new model"
            )
        # Up to a million pixels per image, sampled as measure_contract samples them.
        sample = [sampled_pixels(s.image, 1_000_000, own.channels) for s in slides]
        scaled = np.concatenate([np.asarray(own.scale(f)) for f in sample])
        contract = replace(
            own,
            dtype=own.dtype or measured.dtype,
            mean=tuple(float(v) for v in scaled.mean(axis=0)),
            std=tuple(max(float(v), 1e-3) for v in scaled.std(axis=0)),
            pixel_size_um=measured.pixel_size_um,
        )
    if contract.pixel_size_um is None:  # here alone: once a run, only when none is kept
        warn_mixed_pixel_sizes(slides, str(config.train_folder))
    # nn.Module's __setattr__ is typed for tensors and modules; any value is allowed
    setattr(model, "pixel_contract", contract)  # noqa: B010
    return contract


def make_slides(config: TrainConfig) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """The training images and the held-out validation images that ``config`` names.

    Folder data: a validation image with a training image's pixels is refused
    (:func:`~segpipe.training.datasets.check_held_out`), and so is one of another dtype or
    channel count than the training images.
    """
    if config.dataset == "folder":
        pairs = read_folder(str(config.train_folder))
        names = pairs[0].class_names
        val = read_folder(str(config.val_folder), class_names=names, names_from=config.train_folder)
        check_held_out(pairs, val)
        # Validation scales its pixels by the contract measured on the training images: other
        # pixels would be scored wrongly (uint8 read as 12-bit), or fail after an epoch.
        kind = pixel_kind(pairs[0].image)
        for v in val:
            if pixel_kind(v.image) != kind:
                raise ValueError(
                    f"validation image {v.path or v.name} is {pixel_kind(v.image)}, the "
                    f"training images of {config.train_folder} are {kind}: the model would "
                    "score it with the training images' pixel scaling; convert it to theirs"
                )
        return list(pairs), list(val)
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
    table = counted_class_weights(np.asarray(counts))
    if config.loss_weights == "balanced":
        return [table.astype(np.float32)[s.labels] for s in slides]
    maps = []
    for i, s in enumerate(slides):
        if s.instances is None:
            name = getattr(s, "path", None) or getattr(s, "name", None) or f"training image {i}"
            raise ValueError(
                f"loss_weights='unet' needs instance labels, and {name} has none (add its "
                "instances/ file, or use loss_weights='balanced')"
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
