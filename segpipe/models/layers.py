"""The pooling and upsampling layers of the lecture notes that torch does not name.

Downsampling by a 2x2 window with stride 2 (the notes' pooling kinds):

* max and average pooling are ``torch.nn.MaxPool2d`` and ``torch.nn.AvgPool2d``;
* :class:`SumPool2d` sums the window (4x the 2x2 average);
* :class:`MinPool2d` takes its minimum (``-maxpool(-x)``).

Upsampling by 2 (the notes' upsampling kinds):

* *unpooling*, :class:`Unpool2d`: each value repeated over its 2x2 block (nearest neighbour);
* *max unpooling* is ``torch.nn.MaxUnpool2d`` fed with the indices its max pool remembered;
* *transposed convolution*, :class:`UpConv2d`: learned, stride 2, cropped to twice the side.

Example
-------
>>> import torch
>>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
>>> SumPool2d()(x).item(), MinPool2d()(x).item()
(10.0, 1.0)
>>> Unpool2d()(x)[0, 0].tolist()
[[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0], [3.0, 3.0, 4.0, 4.0]]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MinPool2d", "SumPool2d", "Unpool2d", "UpConv2d", "he_init"]


class SumPool2d(nn.Module):
    """Sum of each ``kernel_size`` x ``kernel_size`` window (stride ``kernel_size``)."""

    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The average times the window's pixel count: one fused kernel instead of a conv.
        return F.avg_pool2d(x, self.kernel_size) * self.kernel_size**2


class MinPool2d(nn.Module):
    """Minimum of each ``kernel_size`` x ``kernel_size`` window (stride ``kernel_size``)."""

    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -F.max_pool2d(-x, self.kernel_size)


class Unpool2d(nn.Module):
    """The notes' *unpooling*: every value repeated over a ``scale`` x ``scale`` block."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)


class UpConv2d(nn.Module):
    """A learned stride-2 transposed convolution whose output is exactly twice the input side.

    Each input value scales the ``kernel_size`` x ``kernel_size`` kernel, which is added into
    the output at twice the value's position; overlaps sum. An ``n``-pixel side gives
    ``2 * (n - 1) + kernel_size`` pixels: ``2n`` for kernel 2 (the U-Net's up-convolution, no
    overlap) and ``2n + 1`` for kernel 3 (the notes' example, 2x2 -> 5x5). The notes then crop
    to ``2n`` without saying which side; we keep the top-left ``2n`` (drop the last row and
    column), so that input pixel ``i`` lands on output ``2i`` as with every other upsampling
    here, and the third tap spills into the next block.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2) -> None:
        super().__init__()
        if kernel_size not in (2, 3):
            raise ValueError(f"UpConv2d kernel_size must be 2 or 3, got {kernel_size!r}")
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        return self.conv(x)[:, :, : 2 * h, : 2 * w]


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal weights and zero biases for every conv and linear layer: the
    initialisation the U-Net paper uses, std ``sqrt(2 / N)`` with N the inputs of one output
    unit, so ReLU stacks neither die nor explode.

    A transposed convolution's N is its input channels (per group) times the kernel taps
    that reach one output pixel: ``k / s`` per axis (at least 1), on average. torch's fan-in
    counts the whole kernel, which for the 2x2 stride-2 up-convolutions gave 1/2 and 1/4
    of the paper's variance (U-Net, fcn-updown).

    >>> up = nn.ConvTranspose2d(512, 256, kernel_size=2, stride=2)
    >>> he_init(up)
    >>> round(up.weight.std().item() / (2 / 512) ** 0.5, 1)
    1.0
    """
    if any(p.is_meta for p in module.parameters()):
        # Nothing to draw on the meta device (a skeleton built for its sizes only); and
        # torch's meta normal_ imports torch._dynamo, 1.8 s of every model load.
        return
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d):
            taps = math.prod(max(1.0, k / s) for k, s in zip(m.kernel_size, m.stride, strict=True))
            with torch.no_grad():  # one draw, as kaiming_normal_'s: the same random stream
                m.weight.normal_(0.0, math.sqrt(2.0 / (m.in_channels // m.groups * taps)))
        elif isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
