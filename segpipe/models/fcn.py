"""The fully convolutional network (FCN) at full resolution: the second method of the notes.

No fully connected layer and no pooling: ``layers`` 3x3 convolutions + ReLU, each zero-padded
so it keeps height and width, then a 1x1 convolution to one score map per class. Every pixel is
predicted in one pass over an image of any size, and the work the sliding-window classifier
repeats for overlapping patches is shared. The price is that every layer runs at full
resolution, and the receptive field grows by only one pixel per side per layer.

Example
-------
>>> import torch
>>> from segpipe.models.fcn import FCN, FCNConfig
>>> net = FCN(FCNConfig(width=4, layers=3)).eval()
>>> net.geometry
Geometry(halo=3, multiple=1, input_offset=0, shrinks=False)
>>> net(torch.rand(1, 3, 20, 27)).shape
torch.Size([1, 2, 20, 27])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segpipe.geometry.tiling import Geometry
from segpipe.models.base import SegmentationModel, register
from segpipe.models.layers import he_init
from segpipe.models.unet import Head

__all__ = ["FCN", "FCNConfig"]


@dataclass(frozen=True)
class FCNConfig:
    """Hyper-parameters of the full-resolution FCN.

    Parameters
    ----------
    in_channels
        Image channels (3 for RGB).
    num_classes
        Output score maps, background included.
    width
        Channels of every 3x3 convolution.
    layers
        Number of 3x3 conv + ReLU layers; also the halo in pixels (each reaches one pixel
        further per side).
    """

    in_channels: int = 3
    num_classes: int = 2
    width: int = 32
    layers: int = 6

    def __post_init__(self) -> None:
        for field in ("in_channels", "num_classes", "width", "layers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FCNConfig.{field} must be an integer >= 1, got {value!r}")


@register
class FCN(SegmentationModel):
    """``layers`` same-padded 3x3 conv + ReLU at full resolution, then a 1x1 Head.

    Takes ``(N, in_channels, H, W)`` in ``[0, 1]``, any ``H, W``; returns logits
    ``(N, num_classes, H, W)``.
    """

    name = "fcn"
    config_class = FCNConfig
    config: FCNConfig

    def __init__(self, config: FCNConfig | None = None, **kwargs: Any) -> None:
        # kwargs: class_names, input_mean, input_std (see SegmentationModel)
        super().__init__(config, **kwargs)
        config = self.config
        convs: list[nn.Module] = []
        channels = config.in_channels
        for _ in range(config.layers):
            convs += [nn.Conv2d(channels, config.width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = config.width
        self.convs = nn.Sequential(*convs)
        self.head = Head(config.width, config.num_classes)
        he_init(self)

    @property
    def geometry(self) -> Geometry:
        # Same padding keeps the size; an output pixel depends on input pixels up to `layers`
        # away, so that is the halo after which the window's zero padding cannot be seen.
        return Geometry(halo=self.config.layers, multiple=1, input_offset=0, shrinks=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x))
