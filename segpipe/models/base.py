"""What every segpipe network is: a ``torch.nn.Module`` that also says how it must be tiled.

A model takes ``(N, C_in, H, W)`` float tensors scaled to ``[0, 1]``, normalises them with its
own per-channel mean and std, and returns raw class scores (logits) ``(N, num_classes, h, w)``
with ``h = geometry.output_size(H)`` (``w`` likewise). Its ``geometry`` (a
:class:`segpipe.geometry.tiling.Geometry`) is what the tiler reads; the tiler never guesses a halo.

New architectures subclass :class:`SegmentationModel`, set ``name`` and ``config_class``, and
put ``@register`` above the class: adding a model is one new file in ``segpipe/models/``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn

from segpipe.geometry.tiling import Geometry
from segpipe.models.contract import PixelContract
from segpipe.models.eager_code import eager_code

__all__ = [
    "DEFAULT_INPUT_MEAN",
    "DEFAULT_INPUT_STD",
    "REGISTRY",
    "SegmentationModel",
    "class_names_of",
    "code_of",
    "geometry_of",
    "is_registered",
    "pixel_contract_of",
    "register",
    "uses_tile_statistics",
]

# Inputs arrive scaled to [0, 1]. Without dataset statistics we centre them on 0.5 and divide
# by 0.25 (about the std of a uniform [0, 1] channel, 0.29, rounded down), which maps [0, 1]
# onto [-2, 2]: zero-centred and unit-order, as He initialisation expects.
DEFAULT_INPUT_MEAN = 0.5
DEFAULT_INPUT_STD = 0.25


class SegmentationModel(nn.Module):
    """Common base of segpipe networks.

    Subclasses define ``name`` (registry name), ``config_class`` (a frozen dataclass with at
    least ``in_channels`` and ``num_classes``), the ``geometry`` property and ``logits``, the
    network proper on normalised input. ``forward`` checks the input shape, normalises, and
    calls ``logits``.

    Parameters
    ----------
    config
        The model's frozen configuration (an instance of ``config_class``).
    class_names
        One name per output class; default ``("class_0", ..., "class_{C-1}")``.
    input_mean, input_std
        Per-channel statistics of the ``[0, 1]``-scaled input; default 0.5 and 0.25 for every
        channel. Stored as non-persistent buffers: checkpoints keep them beside the state dict,
        not in it, so the state dict holds weights only.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[Any]]

    input_mean_buffer: torch.Tensor
    input_std_buffer: torch.Tensor

    def __init__(
        self,
        config: Any = None,
        *,
        class_names: Sequence[str] | None = None,
        input_mean: Sequence[float] | float | None = None,
        input_std: Sequence[float] | float | None = None,
    ) -> None:
        """``config`` defaults to ``config_class()``; subclasses build their layers from
        ``self.config`` after calling this."""
        super().__init__()
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}: {config!r}"
            )
        self.config = config
        c_in, n_classes = config.in_channels, config.num_classes
        if class_names is None:
            class_names = [f"class_{k}" for k in range(n_classes)]
        self.class_names: tuple[str, ...] = tuple(str(c) for c in class_names)
        if len(self.class_names) != n_classes:
            raise ValueError(
                f"{len(self.class_names)} class names {self.class_names} for a model with "
                f"num_classes={n_classes}"
            )
        if len(set(self.class_names)) != n_classes:
            raise ValueError(f"class names must be distinct, got {self.class_names}")
        self.input_mean = _per_channel("input_mean", input_mean, DEFAULT_INPUT_MEAN, c_in)
        self.input_std = _per_channel("input_std", input_std, DEFAULT_INPUT_STD, c_in)
        if any(s <= 0 for s in self.input_std):
            raise ValueError(f"input_std must be > 0 for every channel, got {self.input_std}")
        shape = (1, c_in, 1, 1)
        self.register_buffer(
            "input_mean_buffer", torch.tensor(self.input_mean).view(shape), persistent=False
        )
        self.register_buffer(
            "input_std_buffer", torch.tensor(self.input_std).view(shape), persistent=False
        )
        # Set by segpipe.models.checkpoint.load from the file; None for a model built in memory.
        self.checkpoint_metrics: dict[str, Any] | None = None
        # What the model was trained on (channels, dtype, value scaling, pixel size); set by
        # training and kept in the checkpoint. None: the dtype rule (pixels.to_float01).
        self.pixel_contract: PixelContract | None = None

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def geometry(self) -> Geometry:
        raise NotImplementedError(f"{type(self).__name__} must define the geometry property")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network on normalised input; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must define logits()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(N, num_classes, h, w)`` for a ``[0, 1]`` batch ``(N, C_in, H, W)``."""
        self.check_input_shape(x)
        x = (x - self.input_mean_buffer) / self.input_std_buffer
        return self.logits(x)

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise ValueError, naming the sizes that would work, if ``x`` does not fit the model.

        A side ``n`` is accepted when ``(n - input_offset) % multiple == 0`` and, for a
        shrinking (valid-padding) model, ``n > 2 * halo`` so that some output remains.
        Non-shrinking models take any side on the lattice, also ones smaller than the halo
        (useful for training crops); only tiles need the halo.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects a (N, {self.in_channels}, H, W) tensor, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects a float tensor scaled to [0, 1], got {x.dtype}"
            )
        g = self.geometry
        sides = zip(("height", "width"), x.shape[2:], strict=True)
        bad = [(axis, n) for axis, n in sides if not _fits(g, n)]
        if bad:
            hints = "; ".join(f"{axis} {n}: use {_nearest_sizes(g, n)}" for axis, n in bad)
            raise ValueError(
                f"{type(self).__name__} cannot take input of height={x.shape[2]}, "
                f"width={x.shape[3]}. Accepted sides n satisfy "
                f"n % {g.multiple} == {g.input_offset % g.multiple}"
                + (f" and n > {2 * g.halo}" if g.shrinks else "")
                + f" ({hints}). Pad or crop your image, or pick a size with "
                "model.geometry.input_size(output_size)."
            )


def _fits(g: Geometry, n: int) -> bool:
    return (n - g.input_offset) % g.multiple == 0 and (not g.shrinks or n > 2 * g.halo)


def _nearest_sizes(g: Geometry, n: int) -> str:
    """The accepted sides just below and just above ``n``, as text."""
    below = n - (n - g.input_offset) % g.multiple
    above = below + g.multiple
    smallest = g.input_size(1) if g.shrinks else g.multiple
    if below >= smallest:
        return f"{below} or {above}"
    return f"{max(above, smallest)}"


def _per_channel(
    what: str, values: Sequence[float] | float | None, default: float, channels: int
) -> tuple[float, ...]:
    """``values`` as one float per channel; ValueError naming ``what`` unless they are finite
    numbers (NaN made every probability NaN, as a checkpoint's would, which load refuses)."""
    if values is None:
        values = default
    if isinstance(values, str):  # would be read as its characters: "0.5" as 0, ".", 5
        raise ValueError(f"{what} {values!r} is text: give a number, or one per channel")
    if isinstance(values, int | float):
        out = (float(values),) * channels
    else:
        out = tuple(float(v) for v in values)
    if len(out) != channels:
        raise ValueError(f"{what} needs {channels} values (one per channel), got {out}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} {out} holds NaN or infinite values: give finite numbers")
    return out


# Registry: name -> class. Filled by @register as the model modules are imported (segpipe/models/
# __init__.py imports every module of the package, so a new file is all a new model needs).
REGISTRY: dict[str, type[SegmentationModel]] = {}

M = TypeVar("M", bound=type[SegmentationModel])


def register(cls: M) -> M:
    """Class decorator: make ``cls`` buildable as ``segpipe.models.build(cls.name, ...)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute name: str to be registered")
    taken = REGISTRY.get(name)
    # The same class defined again (importlib.reload) replaces itself; another class may not.
    if taken is not None and _class_path(taken) != _class_path(cls):
        raise ValueError(
            f"model name {name!r} is taken by {REGISTRY[name].__module__}."
            f"{REGISTRY[name].__qualname__}; pick another for {cls.__qualname__}"
        )
    REGISTRY[name] = cls
    return cls


def is_registered(model: SegmentationModel) -> bool:
    """Whether ``model``'s class is the one its name registers (a subclass is not: its code is
    not the registry's). Compared by module and name, as :func:`register` does."""
    registered = REGISTRY.get(model.name)
    return _class_path(registered) == _class_path(type(model)) if registered else False


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def code_of(module: nn.Module) -> str:
    """What ``module`` computes, beside its weights, as text: its TorchScript code (each
    submodule's ``forward``; a container has none) or its exported graph's code, else its
    class and repr (layers and their settings) and the code of every class in it that is not
    torch's (:func:`~segpipe.models.eager_code.eager_code`). For fingerprints of networks not
    segpipe's."""
    if isinstance(module, torch.fx.GraphModule):
        return str(module.code)
    if isinstance(module, torch.jit.ScriptModule):
        return "\n".join(f"{n}:{getattr(sub, 'code', '')}" for n, sub in module.named_modules())
    return eager_code(module)


def geometry_of(module: nn.Module) -> Geometry:
    """The tiling geometry a module declares (its ``geometry`` attribute).

    Raises TypeError for a module that does not declare one: the tiler needs it to know the
    halo and size rule, and will not guess.
    """
    geometry = getattr(module, "geometry", None)
    if not isinstance(geometry, Geometry):
        raise TypeError(
            f"{type(module).__name__} has no segpipe geometry (found {geometry!r}). Give your "
            "module a `geometry` attribute or property returning a "
            "segpipe.geometry.tiling.Geometry "
            "(halo, multiple, input_offset, shrinks) so the tiler knows how much context each "
            "output pixel needs; or subclass segpipe.models.base.SegmentationModel."
        )
    return geometry


def pixel_contract_of(module: nn.Module) -> PixelContract | None:
    """The :class:`~segpipe.models.contract.PixelContract` inference must honour for ``module``.

    The module's own ``pixel_contract`` when it has one; else, for a module that says its
    ``in_channels``, that many channels scaled by the dtype rule (models saved before
    contracts existed); else None (a plain module: pixels are scaled by the dtype rule and
    nothing is checked).
    """
    contract = getattr(module, "pixel_contract", None)
    if isinstance(contract, PixelContract):
        return contract
    channels = getattr(module, "in_channels", None)
    if isinstance(channels, int) and not isinstance(channels, bool):
        return PixelContract(channels=channels)
    return None


def class_names_of(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s output classes, in channel order: its own ``class_names``,
    else ``class_0 .. class_{n-1}`` for its ``num_classes``."""
    if names := getattr(module, "class_names", None):
        return tuple(names)
    count = getattr(module, "num_classes", None)
    # An integer (numpy's, a tensor's too), not 2.9 (2 classes) nor True (1).
    integral = hasattr(count, "__index__") and not isinstance(count, bool)
    if (n := operator.index(cast(int, count)) if integral else -1) < 1:
        raise TypeError(
            f"{type(module).__name__} says no class_names and a num_classes of {count!r}: give "
            "it either (segpipe must know how many classes its output channels are)"
        )
    return tuple(f"class_{i}" for i in range(n))


# Normalisation layers by class name: how TorchScript keeps a module's class (``original_name``),
# and what an eager module's class or one of its torch bases is called.
_NORM_KINDS: dict[str, str] = {
    "GroupNorm": "group",
    "LayerNorm": "layer",
    "SyncBatchNorm": "running",
    **{
        f"{lazy}{norm}{d}d": "running"
        for lazy in ("", "Lazy")
        for norm in ("BatchNorm", "InstanceNorm")
        for d in (1, 2, 3)
    },
}
# The same layers as the operators of an exported graph (torch.export), by operator name.
_NORM_OPS: dict[str, str] = {
    "group_norm": "group",
    "native_group_norm": "group",
    "layer_norm": "layer",
    "native_layer_norm": "layer",
    "instance_norm": "running",
    "batch_norm": "running",
    "native_batch_norm": "running",
    "_native_batch_norm_legit": "running",
    "_native_batch_norm_legit_functional": "running",
    "_native_batch_norm_legit_no_training": "running",
}


def uses_tile_statistics(module: nn.Module) -> list[str]:
    """Qualified names of submodules that normalise with statistics of the tile they see.

    Such layers make neighbouring tiles disagree whatever the halo: the result depends on
    what else is in the window. Flagged:

    * GroupNorm, always (statistics over each sample's groups and pixels);
    * InstanceNorm*, unless it tracks running statistics, has them, and is in eval mode;
    * BatchNorm*, in training mode, or without running statistics
      (``track_running_stats=False``);
    * LayerNorm whose ``normalized_shape`` has two or more dimensions: on ``(N, C, H, W)``
      maps that spans the pixels. A one-dimensional LayerNorm is taken to be the per-pixel
      channel norm of channels-last blocks (ConvNeXt) and is not flagged.

    Eager modules are matched by class, TorchScript ones (traced or scripted) by the class
    they were made from, and an exported program's module (``torch.export``) by the
    normalisation operators in its graph, named after the module they came from. Normalisation
    done with ``torch.nn.functional`` calls inside an eager ``forward`` cannot be seen. The
    root module itself, if it is such a layer, is reported as ``""``.
    """
    flagged = []
    for qualified_name, sub in module.named_modules():
        if isinstance(sub, torch.fx.GraphModule):
            prefix = f"{qualified_name}." if qualified_name else ""
            flagged += [prefix + name for name in _graph_tile_norms(sub)]
        elif _is_tile_norm(sub):
            flagged.append(qualified_name)
    return flagged


def _is_tile_norm(sub: nn.Module) -> bool:
    if isinstance(sub, torch.jit.ScriptModule):
        names = [str(getattr(sub, "original_name", ""))]
    else:  # the class or a torch base of it: a user's subclass of GroupNorm is one too
        names = [c.__name__ for c in type(sub).__mro__ if c.__module__.startswith("torch.nn")]
    kind = next((_NORM_KINDS[n] for n in names if n in _NORM_KINDS), None)
    if kind == "group":
        return True
    if kind == "layer":
        shape = getattr(sub, "normalized_shape", None)
        if shape is None:  # traced: the shape is a constant of the graph
            shape = _traced_norm_argument(sub, 1)
        return not isinstance(shape, Sequence) or len(shape) >= 2
    if kind == "running":
        tracks = getattr(sub, "track_running_stats", None)
        if tracks is None:  # traced: whether it uses the input's statistics was fixed then
            return _traced_norm_argument(sub, 5) is not False
        return bool(sub.training or not tracks or getattr(sub, "running_mean", None) is None)
    return False


def _traced_norm_argument(sub: nn.Module, index: int) -> Any:
    """Argument ``index`` of the normalisation call in a traced module's graph, when it is a
    constant (a list of constants for a shape); None when there is none."""
    if not isinstance(sub, torch.jit.ScriptModule):
        return None
    for node in sub.graph.nodes():
        if node.kind().startswith("aten::") and node.kind().endswith("_norm"):
            value = list(node.inputs())[index]
            maker = value.node()
            if maker.kind() == "prim::Constant":
                return value.toIValue()
            if maker.kind() == "prim::ListConstruct":
                return [v.toIValue() for v in maker.inputs()]
    return None


def _graph_tile_norms(graph_module: torch.fx.GraphModule) -> list[str]:
    """Per-tile normalisations among an exported graph's operators, by the module each came
    from (the node's name when the graph does not say)."""
    flagged = []
    for node in graph_module.graph.nodes:
        op = getattr(node.target, "__name__", "").split(".")[0]  # "instance_norm.default"
        kind = _NORM_OPS.get(op) if node.op == "call_function" else None
        if kind is None:
            continue
        if kind == "layer":
            shape = node.args[1]
            per_tile = not isinstance(shape, Sequence) or len(shape) >= 2
        elif kind == "running":
            # the first flag is training / use_input_stats (none: eval-mode batch norm)
            per_tile = next((a for a in node.args if isinstance(a, bool)), False)
        else:
            per_tile = True
        if per_tile:
            stack = node.meta.get("nn_module_stack") or {}
            flagged.append(next(reversed(stack.values()))[0] if stack else node.name)
    return flagged
