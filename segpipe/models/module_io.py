"""What a foreign network takes and gives: its input channels and its class scores, checked
against the class names before a run rather than found out in one."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from segpipe.geometry.tiling import Geometry

__all__ = ["check_classes", "first_conv_channels", "set_mode"]


def first_conv_channels(module: nn.Module) -> int | None:
    """Input channels of the first convolution, None when there is none to read."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            return int(sub.in_channels)
    for p in module.parameters():  # TorchScript and exported modules: the first 4-D weight
        if p.ndim == 4:
            return int(p.shape[1])
    return None


@torch.no_grad()
def check_classes(
    module: nn.Module,
    channels: int,
    geometry: Geometry,
    class_names: Sequence[str],
    classes: int | None = None,
) -> None:
    """Raise ValueError unless ``module`` gives one score channel per class name.

    ``classes`` is the count a pass already gave (the geometry probe's); without it, an
    exported graph's recorded output tells (its input size may be fixed at export), else one
    pass at the geometry's smallest input, where the module takes it."""
    if classes is None and isinstance(module, GraphModule):
        out = next(n for n in module.graph.nodes if n.op == "output").args[0]
        val = getattr(out[0] if isinstance(out, tuple | list) else out, "meta", {}).get("val")
        if isinstance(val, torch.Tensor) and val.ndim == 4 and isinstance(val.shape[1], int):
            classes = val.shape[1]
    if classes is None:
        side = geometry.input_size(geometry.multiple)
        # On the module's device and in its precision: a CUDA or half module refuses others.
        weight = next((p for p in module.parameters() if p.is_floating_point()), None)
        x = torch.zeros(1, channels, side, side)
        try:
            y = module(x if weight is None else x.to(weight))
        except Exception:
            # A layer of fixed size (LayerNorm([C, H, W]), a static export) refuses this
            # input; such a module was never refused for that, so its count goes unchecked.
            return
        if not isinstance(y, torch.Tensor) or y.ndim != 4:
            raise TypeError(
                f"{type(module).__name__} returned {type(y).__name__}, not class scores "
                "(N, classes, H, W): wrap a module whose forward returns them"
            )
        classes = int(y.shape[1])
    # Unchecked, more outputs were softmaxed and cut to the names; fewer failed mid-run.
    if classes != len(class_names):
        raise ValueError(
            f"{type(module).__name__} gives {classes} output channels, but there are "
            f"{len(class_names)} class names {list(class_names)}: give one name per channel"
        )


def set_mode(module: nn.Module, training: bool) -> None:
    """``module.train(training)``, where it can be: an exported program's module refuses, its
    mode fixed at export."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
