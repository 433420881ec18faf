"""What a foreign network takes and gives: its input channels, its class scores and the size
of its output, checked against what it was declared to be before a run rather than found out
in one."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from segpipe.geometry.tiling import Geometry

__all__ = [
    "channel_mismatch",
    "check_classes",
    "check_geometry",
    "first_conv_channels",
    "module_name",
    "set_mode",
]

# What torch's convolutions say when the input has other channels than their weights take.
_CHANNELS = re.compile(r"expected input(\[[^\]]*\])? to have \d+ channels, but got \d+ channels")
# The output sides the given geometry is checked at: at least this many pixels (one output
# pixel could hide an off-by-a-few halo behind a kernel that no longer fits).
_CHECK_OUTPUT = 16


def module_name(module: nn.Module) -> str:
    """The network's class name, a TorchScript module's original one."""
    return str(getattr(module, "original_name", "") or type(module).__name__)


def first_conv_channels(module: nn.Module) -> tuple[int, str] | None:
    """Input channels of the first convolution registered, and its name; None when there is
    none to read. Registered first is not always met first: :func:`channel_mismatch` says."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return int(sub.in_channels), name or "the module itself"
    for name, p in module.named_parameters():  # TorchScript, exported: the first 4-D weight
        if p.ndim == 4:
            return int(p.shape[1]), name
    return None


def channel_mismatch(err: BaseException) -> str | None:
    """torch's words when ``err`` is a convolution refusing the input's channel count."""
    found = _CHANNELS.search(str(err))
    return found.group(0) if found else None


@torch.no_grad()
def check_geometry(module: nn.Module, channels: int, geometry: Geometry) -> int | None:
    """Raise ValueError unless ``module`` maps inputs to the output sizes ``geometry`` says.

    Runs it at two input shapes, ``a x b`` and ``b x a`` (the inputs for ``m`` and ``2m``
    output pixels, ``m`` on the multiple): a same-padding network declared valid, a halo
    other than a valid-padding network's, an output upsampled past its input all show; a
    same-padding network's halo does not (its output sizes do not depend on it). Returns how
    many class scores it gave; None, with a warning, when the module refuses those inputs (a
    layer of fixed size, a static export), whose geometry then goes unchecked.

    A convolution refusing the channel count is torch's RuntimeError, raised as it is.
    """
    m = geometry.multiple * -(-_CHECK_OUTPUT // geometry.multiple)
    sides = (geometry.input_size(m), geometry.input_size(2 * m))
    classes = None
    shapes = [sides, sides[::-1]]
    while shapes:
        h, w = shapes.pop(0)
        try:
            out = module(_zeros(module, channels, h, w))
        except Exception as err:
            if channel_mismatch(err):
                raise
            if h != w and classes is None:  # one that takes squares only: they count classes
                shapes = [(sides[0], sides[0])]
            warnings.warn(
                f"{module_name(module)} refuses an input of {h}x{w} pixels, which its geometry "
                f"{geometry} says it takes ({type(err).__name__}: {str(err)[:200]}), so the "
                "geometry goes unchecked" + (" but at a square input" if shapes else ""),
                stacklevel=5,  # the caller of wrap(), past no_grad's wrapper
            )
            continue
        y = _scores(module, out)
        expected = (geometry.output_size(h), geometry.output_size(w))
        if tuple(y.shape[2:]) != expected:
            raise ValueError(
                f"{module_name(module)} maps an input of {h}x{w} pixels to an output of "
                f"{y.shape[2]}x{y.shape[3]}, but the geometry given, {geometry}, says "
                f"{expected[0]}x{expected[1]}: {_fitting(h, int(y.shape[2]))}"
            )
        classes = int(y.shape[1])
    return classes


def _zeros(module: nn.Module, channels: int, h: int, w: int) -> torch.Tensor:
    """Zeros ``(1, channels, h, w)`` on the module's device and in its precision (a CUDA or
    half module refuses others)."""
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    x = torch.zeros(1, channels, h, w)
    return x if weight is None else x.to(weight)


def _scores(module: nn.Module, y: object) -> torch.Tensor:
    """``y``, the module's output; TypeError unless it is class scores ``(N, classes, H, W)``."""
    if not isinstance(y, torch.Tensor) or y.ndim != 4:
        raise TypeError(
            f"{module_name(module)} returned {type(y).__name__}, not class scores "
            "(N, classes, H, W): wrap a module whose forward returns them"
        )
    return y


def _fitting(side: int, out: int) -> str:
    """What geometry fits a network whose input of ``side`` pixels gives ``out``."""
    if out == side:
        return "a same-padding network: give shrinks=False (or no geometry: it is measured)"
    if out < side and (side - out) % 2 == 0:
        return f"a valid-padding network: give shrinks=True and halo={(side - out) // 2}"
    return (
        "segpipe tiles networks whose output is their input's size (same padding) or the "
        "input less 2 * halo pixels a side (valid padding); crop or resample in the module"
    )


def check_classes(
    module: nn.Module, class_names: Sequence[str], classes: int | None = None
) -> None:
    """Raise ValueError unless ``module`` gives one score channel per class name.

    ``classes`` is the count a pass already gave (the geometry probe's or check's); without
    it, an exported graph's recorded output tells (its input size may be fixed at export);
    else nothing does and the count goes unchecked."""
    if classes is None and isinstance(module, GraphModule):
        out = next(n for n in module.graph.nodes if n.op == "output").args[0]
        val = getattr(out[0] if isinstance(out, tuple | list) else out, "meta", {}).get("val")
        if isinstance(val, torch.Tensor) and val.ndim == 4 and isinstance(val.shape[1], int):
            classes = val.shape[1]
    # Unchecked, more outputs were softmaxed and cut to the names; fewer failed mid-run.
    if classes is not None and classes != len(class_names):
        raise ValueError(
            f"{module_name(module)} gives {classes} output channels, but there are "
            f"{len(class_names)} class names {list(class_names)}: give one name per channel"
        )


def set_mode(module: nn.Module, training: bool) -> None:
    """``module.train(training)``, where it can be: an exported program's module refuses, its
    mode fixed at export."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
