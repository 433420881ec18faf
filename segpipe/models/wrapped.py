"""Bring your own network: :func:`wrap` makes any ``nn.Module`` a segpipe model.

A MONAI ``BasicUNet``, a segmentation_models.pytorch ``Unet``, a TorchScript file: anything that
maps ``(N, C, H, W)`` to class scores ``(N, classes, H, W)``. The tiler needs the network's
geometry (its halo and size multiple); :func:`~segpipe.models.probe.measure_geometry` finds
them with a gradient probe when they are not given.

>>> from torch import nn
>>> net = wrap(nn.Conv2d(3, 2, 5, padding=2), class_names=["bg", "fg"])
>>> net.geometry
Geometry(halo=2, multiple=1, input_offset=0, shrinks=False)
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segpipe.geometry.tiling import Geometry
from segpipe.models.base import SegmentationModel
from segpipe.models.contract import PixelContract
from segpipe.models.module_io import (
    channel_mismatch,
    check_classes,
    check_geometry,
    first_conv_channels,
    module_name,
    set_mode,
)
from segpipe.models.probe import measured_geometry

__all__ = ["SavedModule", "WrappedConfig", "WrappedModel", "wrap"]


@dataclass(frozen=True)
class WrappedConfig:
    """What a wrapped network is: channels, classes, the module's class and its geometry."""

    in_channels: int = 3
    num_classes: int = 2
    module: str = ""
    halo: int = 0
    multiple: int = 1
    input_offset: int = 0
    shrinks: bool = False


@dataclass(frozen=True, repr=False)
class SavedModule:
    """A TorchScript or ``torch.export`` file's bytes (``kind``: ``"torchscript"`` or
    ``"torch.export"``). Neither module pickles, so a :class:`WrappedModel` of one pickles
    this in its place: a Dask worker loads a copy of its own."""

    data: bytes
    kind: str

    @classmethod
    def of(cls, module: nn.Module) -> SavedModule | None:
        """A TorchScript module saved; None for any other (eager ones pickle as they are)."""
        if not isinstance(module, torch.jit.ScriptModule):
            return None
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        return cls(buffer.getvalue(), "torchscript")

    def load(self) -> nn.Module:
        """The module, on the CPU."""
        if self.kind == "torchscript":
            return torch.jit.load(io.BytesIO(self.data), map_location="cpu")
        if self.kind == "torch.export":
            return torch.export.load(io.BytesIO(self.data)).module()
        raise ValueError(f"format {self.kind!r} is neither 'torchscript' nor 'torch.export'")


class WrappedModel(SegmentationModel):
    """A foreign ``nn.Module`` behind the :class:`SegmentationModel` interface.

    ``forward`` normalises the contract-scaled ``[0, 1]`` input with ``input_mean`` and
    ``input_std`` (default 0 and 1: the module sees ``[0, 1]``) and calls the module. Not in
    the registry: :func:`segpipe.models.save` refuses it (a checkpoint never carries code).
    """

    name = "wrapped"
    config_class = WrappedConfig
    #: The module's file, where the module does not pickle (:class:`SavedModule`).
    saved: SavedModule | None = None

    def __init__(
        self,
        module: nn.Module,
        config: WrappedConfig,
        *,
        class_names: Sequence[str] | None = None,
        input_mean: Sequence[float] | float | None = None,
        input_std: Sequence[float] | float | None = None,
    ) -> None:
        super().__init__(
            config,
            class_names=class_names,
            input_mean=0.0 if input_mean is None else input_mean,
            input_std=1.0 if input_std is None else input_std,
        )
        self.module = module

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        saved = self.saved or SavedModule.of(self.module)
        if saved is not None:  # the file goes in the module's place, loaded on unpickling
            state["_modules"] = {**state["_modules"], "module": None}
            state["saved"] = saved
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.saved is not None:
            self.module = self.saved.load()
            set_mode(self.module, self.training)

    def train(self, mode: bool = True) -> WrappedModel:
        """Set train/eval mode; a ``torch.export`` module has its mode fixed at export."""
        self.training = mode
        set_mode(self.module, mode)
        return self

    @property
    def geometry(self) -> Geometry:
        c = self.config
        return Geometry(c.halo, c.multiple, c.input_offset, c.shrinks)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the wrapped {self.config.module} returned {type(out).__name__}, not a tensor "
                "of class scores; wrap a module whose forward returns (N, classes, H, W)"
            )
        return out


def wrap(
    module: nn.Module,
    *,
    class_names: Sequence[str],
    in_channels: int | None = None,
    halo: int | None = None,
    multiple: int | None = None,
    geometry: Geometry | None = None,
    input_mean: Sequence[float] | float | None = None,
    input_std: Sequence[float] | float | None = None,
    pixel_contract: PixelContract | None = None,
) -> WrappedModel:
    """Any ``nn.Module`` from ``(N, C, H, W)`` input to ``(N, classes, H, W)`` logits as a
    segpipe model, in eval mode.

    Parameters
    ----------
    module
        The network; it receives the pixels scaled by ``pixel_contract`` (default: the dtype
        rule, ``[0, 1]``) and then normalised by ``input_mean``/``input_std``.
    class_names
        One name per output channel.
    in_channels
        Input channels; default: the contract's, else the first convolution's registered.
    halo, multiple
        Context in pixels each output pixel needs, and the size multiple; measured with
        :func:`~segpipe.models.probe.measure_geometry` when not given.
    geometry
        The whole geometry instead (e.g. for a valid-padding network, which the probe does
        not measure). A geometry given (or both halo and multiple) is checked against the
        module's output at two input sizes (:func:`~segpipe.models.module_io.check_geometry`).
        Sizes show a valid-padding network's halo wrong, not a same-padding one's (its output
        is its input's size whatever it reaches): declared too small, exact tiles differ from
        a whole-image pass; leave ``halo`` out and the probe measures it.
    input_mean, input_std
        Per-channel normalisation applied before the module; default 0 and 1 (none).
    pixel_contract
        How image pixels become the module's input, and what images it takes.
    """
    set_mode(module, False)
    channels = in_channels or (pixel_contract.channels if pixel_contract is not None else None)
    guessed = None if channels else first_conv_channels(module)
    if guessed is not None:
        channels = guessed[0]
    if channels is None:
        raise ValueError(
            f"cannot tell how many channels {module_name(module)} takes: pass in_channels="
        )
    try:
        geometry, classes = _checked_geometry(module, int(channels), halo, multiple, geometry)
    except RuntimeError as err:
        if (refusal := channel_mismatch(err)) is None:
            raise
        if guessed is not None:
            raise ValueError(
                f"{module_name(module)}: guessed in_channels={channels} from {guessed[1]} (the "
                "first convolution registered, which need not be the first the input meets), "
                f"and it refuses that many ({refusal}): pass in_channels="
            ) from err
        raise ValueError(
            f"{module_name(module)} refuses in_channels={channels}: {refusal}; pass the "
            "channels it takes"
        ) from err
    check_classes(module, class_names, classes)
    config = WrappedConfig(
        in_channels=int(channels),
        num_classes=len(class_names),
        module=f"{type(module).__module__}.{type(module).__qualname__}",
        **dataclasses.asdict(geometry),
    )
    net = WrappedModel(
        module, config, class_names=class_names, input_mean=input_mean, input_std=input_std
    )
    if pixel_contract is not None and pixel_contract.channels != channels:
        raise ValueError(
            f"pixel_contract has {pixel_contract.channels} channels, the module takes {channels}"
        )
    net.pixel_contract = pixel_contract
    return net.eval()


def _checked_geometry(
    module: nn.Module,
    channels: int,
    halo: int | None,
    multiple: int | None,
    geometry: Geometry | None,
) -> tuple[Geometry, int | None]:
    """The geometry measured, or the one given checked against the module's output sizes
    (a wrong one tiled silently wrong, or failed mid-run); and the class count seen."""
    if geometry is None:
        geometry, classes = measured_geometry(module, channels, halo, multiple)
        if classes is not None:  # the probe ran, and saw output the input's size
            return geometry, classes
    return geometry, check_geometry(module, channels, geometry)
