"""The sliding-window classifier: the first method of the notes, and the baseline.

For every pixel, cut the ``patch`` x ``patch`` window centred on it, classify the window with a
small CNN, and give the pixel that class. It is correct, and wasteful on purpose: neighbouring
patches share all but one row or column, yet each is run through the classifier from scratch.
The fully convolutional networks (``fcn``, ``fcn-updown``, ``unet``) exist to remove that waste,
and this model is kept honest so that the benchmark can show by how much.

Read top to bottom: configuration, the patch classifier, the network, its geometry.

Example
-------
>>> import torch
>>> from segpipe.models.sliding_window import SlidingWindow, SlidingWindowConfig
>>> net = SlidingWindow(SlidingWindowConfig(patch=9, width=4)).eval()
>>> net.geometry
Geometry(halo=4, multiple=1, input_offset=0, shrinks=True)
>>> net(torch.rand(1, 3, 20, 24)).shape  # one patch per output pixel: 12 x 16 patches
torch.Size([1, 2, 12, 16])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from segpipe.geometry.tiling import Geometry
from segpipe.models.base import SegmentationModel, register
from segpipe.models.layers import he_init

__all__ = ["PatchClassifier", "SlidingWindow", "SlidingWindowConfig"]


@dataclass(frozen=True)
class SlidingWindowConfig:
    """Hyper-parameters of the sliding-window classifier.

    Parameters
    ----------
    in_channels
        Image channels (3 for RGB).
    num_classes
        Classes, background included.
    patch
        Side of the window classified for each pixel (odd, so that it has a centre pixel).
    width
        Channels of the classifier's first convolution; they double at every stage.
    stages
        Stages of (3x3 conv + ReLU, 2x2 max pool) in the classifier; the patch must survive
        them (``patch >= 2**stages``).
    hidden
        Units of the fully connected layer before the class scores.
    """

    in_channels: int = 3
    num_classes: int = 2
    patch: int = 33
    width: int = 16
    stages: int = 2
    hidden: int = 64

    def __post_init__(self) -> None:
        for field in ("in_channels", "num_classes", "patch", "width", "stages", "hidden"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"SlidingWindowConfig.{field} must be an integer >= 1, got {value!r}"
                )
        if self.patch % 2 == 0:
            raise ValueError(
                f"SlidingWindowConfig.patch must be odd so the patch has a centre pixel, got "
                f"{self.patch}; use {self.patch + 1}"
            )
        if self.patch < 2**self.stages:
            raise ValueError(
                f"SlidingWindowConfig.patch={self.patch} is too small for {self.stages} 2x2 "
                f"poolings; use patch >= {2**self.stages} or fewer stages"
            )


class PatchClassifier(nn.Module):
    """The CNN that labels one patch: ``stages`` x (3x3 conv + ReLU, 2x2 max pool), then a
    fully connected layer + ReLU and a fully connected layer to one score per class.

    Takes ``(B, in_channels, patch, patch)``; returns ``(B, num_classes)``.
    """

    def __init__(self, config: SlidingWindowConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = config.in_channels, config.patch
        for stage in range(config.stages):
            out = config.width * 2**stage
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, side = out, side // 2
        self.features = nn.Sequential(*layers)
        self.classify = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(patches))


@register
class SlidingWindow(SegmentationModel):
    """Classify the patch centred on every pixel; one classifier run per output pixel.

    Takes ``(N, in_channels, H, W)`` in ``[0, 1]``; returns logits
    ``(N, num_classes, H - 2 * halo, W - 2 * halo)``, ``halo = patch // 2``: only pixels
    whose whole patch lies inside the input are classified (valid geometry), so tiles stitch
    exactly.
    """

    name = "sliding-window"
    config_class = SlidingWindowConfig
    config: SlidingWindowConfig

    # Patches per classifier batch: bounds the memory of the unfolded patches
    # (patches_per_chunk * in_channels * patch**2 floats, 53 MB at the defaults), not the work.
    patches_per_chunk: ClassVar[int] = 4096

    def __init__(self, config: SlidingWindowConfig | None = None, **kwargs: Any) -> None:
        # kwargs: class_names, input_mean, input_std (see SegmentationModel)
        super().__init__(config, **kwargs)
        config = self.config
        self.classifier = PatchClassifier(config)
        he_init(self)

    @property
    def geometry(self) -> Geometry:
        return Geometry(halo=self.config.patch // 2, multiple=1, input_offset=0, shrinks=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch
        # A strided view, no copy: windows[n, c, i, j] is the patch whose top-left is (i, j),
        # i.e. the patch centred on input pixel (i + p // 2, j + p // 2).
        windows = x.unfold(2, p, 1).unfold(3, p, 1)  # (N, C, h, w, p, p)
        n, c, h, w = windows.shape[:4]
        rows_per_chunk = max(1, self.patches_per_chunk // w)
        images = []
        for k in range(n):
            rows = []
            for y0 in range(0, h, rows_per_chunk):
                chunk = windows[k, :, y0 : y0 + rows_per_chunk]  # (C, rows, w, p, p)
                patches = chunk.permute(1, 2, 0, 3, 4).reshape(-1, c, p, p)  # copied here
                scores = self.classifier(patches)  # (rows * w, classes)
                rows.append(scores.view(chunk.shape[1], w, -1).permute(2, 0, 1))
            images.append(torch.cat(rows, dim=1))
        return torch.stack(images)
