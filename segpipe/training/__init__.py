"""Train a segmentation model on labelled images, and score it on held-out ones.

A deliberately small loop, readable top to bottom:

1. make the training and validation images that ``TrainConfig.dataset`` names: synthetic H&E
   slides (``"tissue"``) or aerial scenes (``"aerial"``) from :mod:`segpipe.synthetic`, with
   different seeds, or the (image, labels) pairs of two folders (``"folder"``,
   :func:`segpipe.training.datasets.read_folder`);
2. sample batches of (input window, label crop) pairs that follow the model's geometry: the
   labels are the pixels the model predicts. For a valid-padding model the input is that crop
   plus the model's context (its halo, mirrored at image borders as in the U-Net paper); a
   same-padding model predicts its whole input, so the labels are the whole window, halo
   included. See :func:`patch_pair` (:mod:`segpipe.training.sampling`);
3. augment each pair, the same way on image and labels: a random elastic deformation
   (optional), a random flip and 90° rotation, an intensity jitter (optional), see
   :class:`Augmentation` (:mod:`segpipe.training.augmentation`);
4. minimise pixel-wise softmax cross-entropy
   (:func:`segpipe.training.losses.softmax_cross_entropy`),
   optionally weighted per pixel (balanced classes, or the U-Net border weights of
   :func:`segpipe.training.losses.unet_weight_map` where instance labels exist), with Adam;
5. after each epoch, score the validation images with
   :func:`segpipe.analysis.evaluation.evaluate_model`: predicted tile by tile by the
   pipeline's overlap-tile stitcher (:func:`segpipe.execution.stitching.predict_labels`), per-class
   Dice and IoU from one confusion matrix, object F1 where there are instances; and write a
   checkpoint that training can resume from.

Everything random comes from ``TrainConfig.seed``: the same config on the same machine and
thread count gives the same weights, also across an interruption and a resume.

The config and the data it names live in :mod:`segpipe.training.config`, the state a checkpoint
keeps for a resume in :mod:`segpipe.training.state`, the model file's output (checked before
training, placed after it) in :mod:`segpipe.training.output`; every name in ``__all__``
imports from this package.
"""

from __future__ import annotations

from segpipe.training.augmentation import (
    Augmentation,
    augment,
    elastic_deformation,
    intensity_jitter,
)
from segpipe.training.config import (
    TrainConfig,
    class_names_for,
    loss_weight_maps,
    make_slides,
    pixel_contract_for,
)
from segpipe.training.loop import check_output, format_report, initial_model, save_trained, train
from segpipe.training.sampling import Batch, patch_pair, sample_batch, sample_pairs
from segpipe.training.state import state_path

__all__ = [
    "Augmentation",
    "Batch",
    "TrainConfig",
    "augment",
    "check_output",
    "class_names_for",
    "elastic_deformation",
    "format_report",
    "initial_model",
    "intensity_jitter",
    "loss_weight_maps",
    "make_slides",
    "patch_pair",
    "pixel_contract_for",
    "sample_batch",
    "sample_pairs",
    "save_trained",
    "state_path",
    "train",
]
