"""U-Net (Ronneberger, Fischer and Brox 2015), as the lecture notes build it.

Read top to bottom: configuration, the four kinds of block, the network, its geometry.

With ``width=64, depth=4, padding="valid"`` this is the paper's network::

    572 -> DownBlock  64 (568, pool 284)
        -> DownBlock 128 (280, pool 140)
        -> DownBlock 256 (136, pool  68)
        -> DownBlock 512 ( 64, pool  32)
        -> Bottleneck 1024 (28)
        -> UpBlock 512 (56 -> 52) -> UpBlock 256 (104 -> 100)
        -> UpBlock 128 (200 -> 196) -> UpBlock 64 (392 -> 388) -> Head: 388 x 388 scores

Example
-------
>>> import torch
>>> from segpipe.models.unet import UNet, UNetConfig
>>> net = UNet(UNetConfig(width=4, depth=2)).eval()
>>> net.geometry
Geometry(halo=20, multiple=4, input_offset=0, shrinks=True)
>>> net(torch.rand(1, 3, 60, 60)).shape
torch.Size([1, 2, 20, 20])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from segpipe.geometry.tiling import Geometry
from segpipe.models.base import SegmentationModel, register
from segpipe.models.layers import he_init

__all__ = ["Bottleneck", "DownBlock", "Head", "UNet", "UNetConfig", "UpBlock"]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a U-Net.

    Parameters
    ----------
    in_channels
        Image channels (3 for RGB).
    num_classes
        Output score maps, background included.
    width
        Channels of the first level; they double at every level down (64 in the paper).
    depth
        Number of 2x2 poolings (4 in the paper); the bottleneck has ``width * 2**depth``
        channels.
    padding
        ``"valid"``: unpadded 3x3 convolutions as in the paper; the output shrinks by the halo
        on every side and tiles stitch exactly. ``"same"``: zero-padded convolutions; the
        output has the input's size.
    dropout
        Drop probability at the end of the contracting path (the bottleneck); only active in
        training mode.
    """

    in_channels: int = 3
    num_classes: int = 2
    width: int = 64
    depth: int = 4
    padding: Literal["valid", "same"] = "valid"
    dropout: float = 0.5

    def __post_init__(self) -> None:
        for field in ("in_channels", "num_classes", "width", "depth"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{field} must be an integer >= 1, got {value!r}")
        if self.padding not in ("valid", "same"):
            raise ValueError(f'UNetConfig.padding must be "valid" or "same", got {self.padding!r}')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")


def double_conv(in_channels: int, out_channels: int, padding: str) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by ReLU: the unit every block is made of."""
    pad = 1 if padding == "same" else 0
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=pad),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=pad),
        nn.ReLU(inplace=True),
    )


class DownBlock(nn.Module):
    """One level of the contracting path: two 3x3 conv + ReLU, then 2x2 max pooling.

    Returns the features before pooling (the skip connection for the matching UpBlock) and
    the pooled map for the next level.
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str) -> None:
        super().__init__()
        self.convs = double_conv(in_channels, out_channels, padding)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.convs(x)
        return skip, self.pool(skip)


class Bottleneck(nn.Module):
    """The lowest level: two 3x3 conv + ReLU, then dropout (the paper's "drop-out layers at
    the end of the contracting path")."""

    def __init__(self, in_channels: int, out_channels: int, padding: str, dropout: float) -> None:
        super().__init__()
        self.convs = double_conv(in_channels, out_channels, padding)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.convs(x))


class UpBlock(nn.Module):
    """One level of the expanding path: a 2x2 stride-2 transposed convolution that doubles the
    side and halves the channels, concatenation with the centre-cropped skip features of the
    matching DownBlock, then two 3x3 conv + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, padding: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.convs = double_conv(in_channels // 2 + out_channels, out_channels, padding)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # Valid convolutions shrink the contracting path's maps more than the expanding path's,
        # so the skip is larger: crop its centre (the paper's "cropping"). With same padding
        # the sizes already agree and this is a no-op.
        dy = (skip.shape[2] - x.shape[2]) // 2
        dx = (skip.shape[3] - x.shape[3]) // 2
        skip = skip[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
        return self.convs(torch.cat([skip, x], dim=1))


class Head(nn.Module):
    """A 1x1 convolution from the first level's features to one score map per class."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@register
class UNet(SegmentationModel):
    """The U-Net of the notes: ``depth`` DownBlocks, a Bottleneck, ``depth`` UpBlocks, a Head.

    Channels are ``width * 2**level``. Takes ``(N, in_channels, H, W)`` in ``[0, 1]``; returns
    logits ``(N, num_classes, h, w)`` with ``h = self.geometry.output_size(H)``.
    """

    name = "unet"
    config_class = UNetConfig
    config: UNetConfig

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any) -> None:
        # kwargs: class_names, input_mean, input_std (see SegmentationModel)
        super().__init__(config, **kwargs)
        config = self.config
        w, d, pad = config.width, config.depth, config.padding
        channels = [w * 2**level for level in range(d + 1)]
        self.down = nn.ModuleList(
            DownBlock(c_in, c_out, pad)
            for c_in, c_out in zip([config.in_channels, *channels[:-2]], channels[:-1], strict=True)
        )
        self.bottleneck = Bottleneck(channels[-2], channels[-1], pad, config.dropout)
        self.up = nn.ModuleList(
            UpBlock(channels[level + 1], channels[level], pad) for level in reversed(range(d))
        )
        self.head = Head(channels[0], config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The paper draws weights from a Gaussian with std sqrt(2 / N), N the inputs of one
        # neuron (He et al.): keeps activations from dying or exploding through ReLU layers.
        he_init(self)

    @property
    def geometry(self) -> Geometry:
        return unet_geometry(self.config.depth, self.config.padding)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            skip, x = block(x)
            skips.append(skip)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = block(x, skip)
        return self.head(x)


def unet_geometry(depth: int, padding: str) -> Geometry:
    """Halo and size rule of a U-Net with ``depth`` poolings.

    Valid padding: each 3x3 convolution costs 2 pixels of side at its level, worth ``2**level``
    input pixels. Writing ``n`` for the input side, the contracting path ends at
    ``(n - 4 * (2**depth - 1)) / 2**depth`` pixels (which must be a whole number: the size rule),
    the bottleneck removes 4 more, and each up level doubles and removes 4, so the output is
    ``n - (12 * 2**depth - 8)``: a halo of ``6 * 2**depth - 4`` per side (92 for depth 4), and
    ``n % 2**depth == 4 * (2**depth - 1) % 2**depth`` (572 % 16 == 12).

    Same padding: the output keeps the input's size and the halo is the receptive-field margin,
    the farthest an input pixel can be from an output pixel that depends on it. Each 3x3
    convolution at level ``l`` reaches ``2**l`` input pixels further; ``4 * (2**depth - 1)``
    for the two paths' convolutions above the bottleneck, ``2 * 2**depth`` for the bottleneck.
    Pooling then upsampling at level ``l`` reaches one more level-``l`` pixel on one side,
    depending on the pixel's phase: ``2**depth - 1`` in all. Total ``7 * 2**depth - 5``
    (107 for depth 4). Checked against autograd in tests/test_models.py.
    """
    multiple = 2**depth
    if padding == "valid":
        return Geometry(
            halo=6 * multiple - 4,
            multiple=multiple,
            input_offset=(4 * (multiple - 1)) % multiple,
            shrinks=True,
        )
    return Geometry(halo=7 * multiple - 5, multiple=multiple, input_offset=0, shrinks=False)
