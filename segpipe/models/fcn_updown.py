"""The FCN with downsampling and upsampling: the third method of the notes.

The first half downsamples (two 3x3 conv + ReLU, then 2x2 pooling, ``levels`` times), so most
convolutions run on small maps and reach far; the second half upsamples back to the input's
size (upsampling by 2, then two 3x3 conv + ReLU, ``levels`` times) and a 1x1 Head gives the
class scores. Unlike the U-Net there are no skip connections: everything the output knows
has passed through the coarsest level (max unpooling's indices are the only fine detail
carried across). Convolutions are zero-padded ("same"), so the output has the input's size.

``pool`` picks the notes' pooling kind (``"max"``, ``"avg"``, ``"sum"``, ``"min"``) and
``upsample`` their upsampling kind:

* ``"unpool"``: repeat each value over its 2x2 block (nearest);
* ``"maxunpool"``: put each value back where the matching max pool took it from, zeros
  elsewhere; only possible after ``pool="max"``, which remembers those positions;
* ``"transpose"``: learned stride-2 transposed convolution, kernel ``transpose_kernel``
  (2, or 3 as in the notes' example, cropped to twice the side).

With ``width=32, levels=2`` and 3 input channels::

    n   -> DownBlock  32 (n,   pool n/2)
        -> DownBlock  64 (n/2, pool n/4)
        -> Bottleneck 128 -> 64 (n/4)
        -> UpBlock    64 (up n/2, -> 32) -> UpBlock 32 (up n, -> 32) -> Head: n x n scores

Example
-------
>>> import torch
>>> from segpipe.models.fcn_updown import FCNUpDown, FCNUpDownConfig
>>> net = FCNUpDown(FCNUpDownConfig(width=4, levels=2, pool="max", upsample="maxunpool"))
>>> net.geometry
Geometry(halo=23, multiple=4, input_offset=0, shrinks=False)
>>> net.eval()(torch.rand(1, 3, 20, 28)).shape
torch.Size([1, 2, 20, 28])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from segpipe.geometry.tiling import Geometry
from segpipe.models.base import SegmentationModel, register
from segpipe.models.layers import MinPool2d, SumPool2d, Unpool2d, UpConv2d, he_init
from segpipe.models.unet import Head, double_conv

__all__ = [
    "POOLS",
    "UPSAMPLES",
    "Bottleneck",
    "DownBlock",
    "FCNUpDown",
    "FCNUpDownConfig",
    "UpBlock",
    "fcn_updown_geometry",
]

Pool = Literal["max", "avg", "sum", "min"]
Upsample = Literal["unpool", "maxunpool", "transpose"]
POOLS: tuple[str, ...] = ("max", "avg", "sum", "min")
UPSAMPLES: tuple[str, ...] = ("unpool", "maxunpool", "transpose")


@dataclass(frozen=True)
class FCNUpDownConfig:
    """Hyper-parameters of the down-then-up FCN.

    Parameters
    ----------
    in_channels
        Image channels (3 for RGB).
    num_classes
        Output score maps, background included.
    width
        Channels of the first level; they double at every level down.
    levels
        Number of 2x2 poolings (and of upsamplings); input sides must be multiples of
        ``2**levels``.
    pool
        ``"max"``, ``"avg"``, ``"sum"`` (4x the average) or ``"min"``; 2x2, stride 2.
    upsample
        ``"unpool"`` (nearest), ``"maxunpool"`` (needs ``pool="max"``) or ``"transpose"``.
    transpose_kernel
        Kernel side of the transposed convolution, 2 or 3; used only by
        ``upsample="transpose"``.
    """

    in_channels: int = 3
    num_classes: int = 2
    width: int = 32
    levels: int = 2
    pool: Pool = "max"
    upsample: Upsample = "transpose"
    transpose_kernel: int = 2

    def __post_init__(self) -> None:
        for field in ("in_channels", "num_classes", "width", "levels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FCNUpDownConfig.{field} must be an integer >= 1, got {value!r}")
        if self.pool not in POOLS:
            raise ValueError(f"FCNUpDownConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(
                f"FCNUpDownConfig.upsample must be one of {UPSAMPLES}, got {self.upsample!r}"
            )
        if self.transpose_kernel not in (2, 3):
            raise ValueError(
                f"FCNUpDownConfig.transpose_kernel must be 2 or 3, got {self.transpose_kernel!r}"
            )
        if self.upsample == "maxunpool" and self.pool != "max":
            raise ValueError(
                f'upsample="maxunpool" cannot follow pool={self.pool!r}: max unpooling puts '
                "each value back where a max pool took it from, and only max pooling remembers "
                'that position. Use pool="max", or upsample="unpool" or "transpose".'
            )


def pooling(kind: str, *, return_indices: bool = False) -> nn.Module:
    """The notes' 2x2 stride-2 pooling of ``kind``; only max pooling can return indices."""
    if kind == "max":
        return nn.MaxPool2d(2, return_indices=return_indices)
    return {"avg": nn.AvgPool2d(2), "sum": SumPool2d(2), "min": MinPool2d(2)}[kind]


def upsampling(kind: str, channels: int, transpose_kernel: int) -> nn.Module:
    """The notes' upsampling by 2 of ``kind``, on maps of ``channels`` channels."""
    if kind == "maxunpool":
        return nn.MaxUnpool2d(2)
    if kind == "transpose":
        return UpConv2d(channels, channels, transpose_kernel)
    return Unpool2d(2)


class DownBlock(nn.Module):
    """One level of the downsampling half: two 3x3 conv + ReLU, then 2x2 pooling.

    Returns the pooled map and, when ``remember_indices`` (max unpooling follows), the argmax
    positions of the pool; otherwise None.
    """

    def __init__(
        self, in_channels: int, out_channels: int, pool: str, remember_indices: bool
    ) -> None:
        super().__init__()
        self.convs = double_conv(in_channels, out_channels, "same")
        self.remember_indices = remember_indices
        self.pool = pooling(pool, return_indices=remember_indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.convs(x)
        if self.remember_indices:
            pooled, indices = self.pool(x)
            return pooled, indices
        return self.pool(x), None


class Bottleneck(nn.Module):
    """The coarsest level: a 3x3 conv + ReLU that widens to ``wide_channels`` and one that
    narrows back, so the first UpBlock sees the channels its max unpooling indices index."""

    def __init__(self, channels: int, wide_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, wide_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(wide_channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class UpBlock(nn.Module):
    """One level of the upsampling half: upsampling by 2, then two 3x3 conv + ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, upsample: str, transpose_kernel: int
    ) -> None:
        super().__init__()
        self.up = upsampling(upsample, in_channels, transpose_kernel)
        self.convs = double_conv(in_channels, out_channels, "same")

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x) if indices is None else self.up(x, indices)
        return self.convs(x)


@register
class FCNUpDown(SegmentationModel):
    """The notes' down-then-up FCN: ``levels`` DownBlocks, a Bottleneck, ``levels`` UpBlocks,
    a Head. Channels are ``width * 2**level``.

    Takes ``(N, in_channels, H, W)`` in ``[0, 1]``, sides multiples of ``2**levels``; returns
    logits ``(N, num_classes, H, W)``.
    """

    name = "fcn-updown"
    config_class = FCNUpDownConfig
    config: FCNUpDownConfig

    def __init__(self, config: FCNUpDownConfig | None = None, **kwargs: Any) -> None:
        # kwargs: class_names, input_mean, input_std (see SegmentationModel)
        super().__init__(config, **kwargs)
        config = self.config
        channels = [config.width * 2**level for level in range(config.levels + 1)]
        remember, kernel = config.upsample == "maxunpool", config.transpose_kernel
        self.down = nn.ModuleList(
            DownBlock(c_in, c_out, config.pool, remember)
            for c_in, c_out in zip([config.in_channels, *channels[:-2]], channels[:-1], strict=True)
        )
        self.bottleneck = Bottleneck(channels[-2], channels[-1])
        self.up = nn.ModuleList(
            UpBlock(level_channels, channels[max(level - 1, 0)], config.upsample, kernel)
            for level, level_channels in reversed(list(enumerate(channels[:-1])))
        )
        self.head = Head(channels[0], config.num_classes)
        he_init(self)

    @property
    def geometry(self) -> Geometry:
        c = self.config
        return fcn_updown_geometry(c.levels, c.upsample, c.transpose_kernel)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        indices = []
        for block in self.down:
            x, idx = block(x)
            indices.append(idx)
        x = self.bottleneck(x)
        for block, idx in zip(self.up, reversed(indices), strict=True):
            x = block(x, idx)
        return self.head(x)


def fcn_updown_geometry(levels: int, upsample: str, transpose_kernel: int = 2) -> Geometry:
    """Halo and size rule of the down-then-up FCN with ``levels`` poolings.

    The output keeps the input's size; sides must be multiples of ``2**levels`` (every pooling
    halves exactly), and tile origins must move in those steps to keep the pooling phase.

    The halo is the receptive-field margin. The convolutions sit where the same-padding
    U-Net's do (two per level on each path, two at the bottom), and a 3x3 convolution at level
    ``l`` reaches ``2**l`` input pixels: ``4 * (2**levels - 1) + 2 * 2**levels``. Pooling then
    upsampling by 2 at level ``l`` reaches one more level-``l`` pixel on one side, depending on
    the pixel's phase: ``2**levels - 1`` in all. Total ``7 * 2**levels - 5`` (23 for two
    levels), whichever pooling and nearest or max unpooling (max unpooling's indices come from
    encoder features inside that reach). A kernel-3 transposed convolution also adds each
    coarse value into the first pixel of the next 2x2 block, one more level-``l`` pixel at
    every level on the left: ``2**levels - 1`` more. Checked against autograd in
    tests/test_models_family.py.
    """
    multiple = 2**levels
    halo = 7 * multiple - 5
    if upsample == "transpose" and transpose_kernel == 3:
        halo += multiple - 1
    return Geometry(halo=halo, multiple=multiple, input_offset=0, shrinks=False)
