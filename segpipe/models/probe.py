"""A network's geometry measured: :func:`measure_geometry` finds the halo and size multiple
of a same-padding network that does not say them, the way the model tests check segpipe's own
architectures:

* the **multiple** is the smallest shift (1, 2, 4, ... 64 pixels) under which the output shifts
  with the input (a network with ``p`` 2x2 poolings is equivariant to shifts of ``2**p``),
  along the rows and along the columns (their least common multiple: a (4, 2) pooling, 4);
* the **halo** is the farthest an input pixel lies from an output pixel that depends on it, for
  every pooling phase and both axes, found with autograd on a copy whose weights are made
  positive (so nothing cancels and every ReLU passes its gradient), whose max poolings are
  average poolings of the same window (a max passes its gradient to one input of its window,
  which one depending on the probe's pixels: the farthest could go unseen) and whose per-tile
  normalisations (InstanceNorm, GroupNorm) are removed (they make every pixel depend on all),
  as are weight_norm and spectral_norm parametrizations (which put back the own weights).
  Only eager layers can be swapped; through the max poolings of TorchScript, of an exported
  graph or of ``F.max_pool2d`` the halo is the farthest of 8 probes with fixed pixels.

Exact mode with the measured halo then equals a whole-image pass over the mirrored image; a
network with per-tile normalisation is refused by exact mode and runs in blend mode, where the
halo still says how much context a window needs.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._python_dispatch import TorchDispatchMode

from segpipe.geometry.tiling import Geometry
from segpipe.models.base import uses_tile_statistics
from segpipe.models.module_io import set_mode

__all__ = ["measure_geometry", "measured_geometry"]

_MAX_MULTIPLE = 64
_MAX_PROBE = 4096  # pixels: a receptive field beyond this is taken to be global
# Probes through max poolings that cannot be swapped: 1 in ~10 undercounts a traced U-Net's halo
# by a pixel or two, so 8 that all do are ~1e-8 (independent pixels).
_MAX_POOL_PROBES = 8


def measure_geometry(
    module: nn.Module,
    in_channels: int,
    *,
    halo: int | None = None,
    multiple: int | None = None,
) -> Geometry:
    """The halo and size multiple of a same-padding network, by gradient probe.

    Works on a float64 copy with positive weights (see the module doc); the module itself is
    left alone. ``halo`` or ``multiple``, when given, are taken as they are.

    Raises
    ------
    ValueError
        When the output is not the input's size (a valid-padding network: give
        ``geometry=``), or the receptive field exceeds 4096 pixels (global pooling or
        attention: give ``halo=`` and use blend mode).
    """
    return measured_geometry(module, in_channels, halo, multiple)[0]


def measured_geometry(
    module: nn.Module, in_channels: int, halo: int | None, multiple: int | None
) -> tuple[Geometry, int | None]:
    """:func:`measure_geometry`, and how many class scores the probe gave (None: nothing
    ran)."""
    if halo is not None and multiple is not None:
        return Geometry(halo=int(halo), multiple=int(multiple)), None
    probe, name = _probe_copy(module), type(module).__name__
    rows, side = _MAX_MULTIPLE, 256
    # Max poolings left in the probe (see the module doc): the farthest of several probes.
    pooled, classes = _first_pass(probe, in_channels, rows, side)
    seeds = range(_MAX_POOL_PROBES if pooled else 1)
    strip = functools.partial(_margins, probe, in_channels, seeds=seeds)
    # How far each axis reaches: the margin of its shifts, and its strip's first length (one
    # sized by the columns' reach was too short for a 19x1 reflect padding, which torch
    # refused). The rows' from one pixel set: the strips below settle the halo.
    if halo is None:
        rows_reach = functools.partial(_margins, probe, in_channels, rows, phases=1, axis=2)
        reach = {
            3: _settled(name, functools.partial(strip, rows, phases=1), side),
            2: _settled(name, rows_reach, side),
        }
    else:
        reach = {3: halo, 2: halo}
    if multiple is None:
        # Each axis by its own shifts: a (4, 2) pooling takes rows in 4s, columns in 2s.
        multiple = math.lcm(*(_multiple(probe, in_channels, rows, reach[a], a) for a in (3, 2)))
    if halo is None:
        halo = _strip_halo(name, strip, multiple, reach)
    return Geometry(halo=int(halo), multiple=int(multiple)), classes


def _strip_halo(
    name: str, strip: Callable[..., int | None], multiple: int, reach: dict[int, int]
) -> int:
    """The halo over every pooling phase and both axes (``reach``: each one's first guess).

    A strip a few multiples high is enough (rows only have to be accepted by the network);
    one thinner than a reflect padding torch refuses, and is made deeper, up to the first
    pass's rows (which the network took)."""
    rows = max(2 * multiple, 8)
    while True:
        try:
            return max(_axis_halo(name, strip, rows, multiple, a, reach[a]) for a in (3, 2))
        except RuntimeError:
            if rows >= _MAX_MULTIPLE:
                raise
            rows *= 2


def _axis_halo(
    name: str, strip: Callable[..., int | None], rows: int, multiple: int, axis: int, reach: int
) -> int:
    """The halo along ``axis`` over every pooling phase, from a strip that grows its length
    from the room for ``reach`` until the receptive field fits."""
    # Room for the farthest phase on both sides; mid (length // 2) on the pooling lattice.
    need = 2 * (reach + multiple) + 4 * multiple
    length = need + (-need) % (2 * multiple)
    return _settled(name, functools.partial(strip, rows, phases=multiple, axis=axis), length)


def _settled(name: str, margins: Callable[[int], int | None], cols: int) -> int:
    """``margins(cols)`` (:func:`_margins`), the strip doubled until the receptive field fits."""
    while (margin := margins(cols)) is None:
        cols *= 2
        if cols > _MAX_PROBE:
            raise ValueError(
                f"{name}: some output pixels depend on input more than {_MAX_PROBE // 2} pixels "
                "away (global pooling or attention?), so no halo makes tiles exact; pass halo= "
                "(the context you want) and use mode='blend'"
            )
    return margin


_AVG_POOLS: dict[type[nn.Module], type[nn.Module]] = {
    nn.MaxPool1d: nn.AvgPool1d,
    nn.MaxPool2d: nn.AvgPool2d,
    nn.MaxPool3d: nn.AvgPool3d,
}


def _average_twin(sub: nn.Module) -> nn.Module | None:
    """The average pooling over ``sub``'s windows, for a max pooling that has one (not one
    with dilation, nor one whose indices a max unpooling needs); else None."""
    if type(sub) not in _AVG_POOLS or getattr(sub, "return_indices", True):
        return None
    dilation = sub.dilation if isinstance(sub.dilation, tuple) else (sub.dilation,)
    if any(d != 1 for d in dilation):
        return None
    return _AVG_POOLS[type(sub)](sub.kernel_size, sub.stride, sub.padding, ceil_mode=sub.ceil_mode)


def _probe_copy(module: nn.Module) -> nn.Module:
    """A float64 eval copy with positive averaging weights and no per-tile normalisation.

    Only an eager module's layers are swapped (see :func:`_first_pass`)."""
    probe = _copied(module)
    set_mode(probe, False)
    _unparametrize(probe)
    swaps: dict[str, nn.Module] = {n: nn.Identity() for n in uses_tile_statistics(probe) if n}
    modules = dict(probe.named_modules())
    for name, sub in modules.items():
        if name and (twin := _average_twin(sub)) is not None:
            swaps[name] = twin
    # TorchScript's and exported graphs' layers stay (their code calls them, not the parent's).
    frozen = [n for n, m in modules.items() if isinstance(m, torch.jit.ScriptModule | GraphModule)]
    for name, replacement in swaps.items():
        if not any(f == "" or name.startswith(f + ".") for f in frozen):
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name], child, replacement)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sub in probe.modules():
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
                # Positive and averaging (sum of weights ~1 per output): values stay O(1)
                # however deep the network, and no two paths cancel.
                fan_in = weight[0].numel()
                weight.copy_((0.5 + torch.rand(weight.shape, generator=generator)) / fan_in)
            elif isinstance(weight, torch.Tensor):
                weight.fill_(1.0)
            bias = getattr(sub, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.fill_(0.01)
            for stat, value in (("running_mean", 0.0), ("running_var", 1.0)):
                buffer = getattr(sub, stat, None)
                if isinstance(buffer, torch.Tensor):
                    buffer.fill_(value)
    return probe.double()


def _copied(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``; a hook-based weight norm's weight, which its hook computes
    (deepcopy refuses such a tensor), goes detached: the copy's hook computes it again."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm | SpectralNorm):
                weight = getattr(sub, hook.name, None)
                if isinstance(weight, torch.Tensor):
                    memo[id(weight)] = weight.detach().clone()
    return copy.deepcopy(module, memo)


def _unparametrize(probe: nn.Module) -> None:
    """Make parametrized weights plain ones, so that the probe's positive weights are the ones
    that run: weight_norm and spectral_norm recompute ``weight`` from their originals at every
    forward, and through the network's own weights a branch dead for the probe's pixels (but
    alive for others) was not measured."""
    for sub in list(probe.modules()):  # removing takes submodules out
        if parametrize.is_parametrized(sub):
            # A copy shares the original's parametrized class, from which removing deletes
            # the weight's property: the copy gets a class of its own.
            cls = type(sub)
            own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            sub.__class__ = type(cls.__name__, cls.__bases__, own)
            for name in list(cast(nn.ModuleDict, sub.parametrizations)):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
        # The old hook-based ones (torch.nn.utils.weight_norm, .spectral_norm) set ``weight``
        # before each forward the same way.
        for hook in list(sub._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                nn.utils.remove_weight_norm(sub, hook.name)
            elif isinstance(hook, SpectralNorm):
                nn.utils.remove_spectral_norm(sub, hook.name)


class _MaxPoolSeen(TorchDispatchMode):
    """Notes whether any max pooling operator runs, however it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.seen = self.seen or "max_pool" in str(func)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def _first_pass(probe: nn.Module, channels: int, rows: int, cols: int) -> tuple[bool, int]:
    """Whether the probe still max-pools: in TorchScript or an exported graph, whose layers
    cannot be swapped, or with ``F.max_pool2d`` in a ``forward`` (seen at the operators, below
    every way of calling them); and how many class scores it gives."""
    with _MaxPoolSeen() as mode:
        y = _run(probe, torch.full((1, channels, rows, cols), 0.5, dtype=torch.float64))
    return mode.seen, int(y.shape[1])


def _run(probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = probe(x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the module returned {type(y).__name__}, not a tensor of class scores")
    if y.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"the module maps an input of {tuple(x.shape[2:])} to an output of "
            f"{tuple(y.shape[2:])}: only same-size (same-padding) networks are measured; "
            "give geometry=segpipe.geometry.tiling.Geometry(halo, multiple, input_offset, "
            "shrinks=True) for a valid-padding one"
        )
    return y


def _margins(
    probe: nn.Module,
    channels: int,
    rows: int,
    cols: int,
    phases: int,
    axis: int = 3,
    *,
    seeds: Sequence[int] = (0,),
) -> int | None:
    """Largest input distance of ``phases`` neighbouring output pixels (along ``axis``: 3 for
    columns, 2 for rows) in the middle of a ``rows x cols`` strip, from the input pixels their
    gradient touches, over probes with pixels drawn from each of ``seeds``; None when some
    touch the strip's end (the strip is too short)."""
    shape = (phases, channels, rows, cols) if axis == 3 else (phases, channels, cols, rows)
    mid, centre = cols // 2, rows // 2
    margin = 0
    for seed in seeds:
        pixels = torch.rand(
            shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        x = (0.5 + 0.5 * pixels).requires_grad_(True)
        y = _run(probe, x)
        picks = [
            # every class: a network may route some inputs to some classes only
            y[b, :, centre, mid + b].sum() if axis == 3 else y[b, :, mid + b, centre].sum()
            for b in range(phases)
        ]
        (grad,) = torch.autograd.grad(torch.stack(picks).sum(), x)
        for b in range(phases):
            g = grad[b].abs().sum(dim=(0, 1) if axis == 3 else (0, 2))
            touched = torch.nonzero(g).flatten()
            lo, hi = int(touched.min()), int(touched.max())
            if lo == 0 or hi == cols - 1:
                return None
            margin = max(margin, mid + b - lo, hi - mid - b)
    return margin


@torch.no_grad()
def _multiple(probe: nn.Module, channels: int, rows: int, margin: int, axis: int) -> int:
    """Smallest power-of-two shift along ``axis`` (3: columns, 2: rows) under which the
    probe's output moves with its input; ``margin``: the reach along that axis."""
    pad = margin + _MAX_MULTIPLE  # beyond any phase's reach
    width = 2 ** math.ceil(math.log2(2 * pad + _MAX_MULTIPLE))
    shape = [1, channels, rows, rows]
    shape[axis] = width + _MAX_MULTIPLE
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64, generator=generator)
    base = _run(probe, x.narrow(axis, 0, width)).narrow(axis, pad, width - 2 * pad)
    shift = 1
    while shift <= _MAX_MULTIPLE:
        moved = _run(probe, x.narrow(axis, shift, width))
        if torch.allclose(
            moved.narrow(axis, pad - shift, width - 2 * pad), base, rtol=1e-9, atol=1e-12
        ):
            return shift
        shift *= 2
    raise ValueError(
        f"the output does not follow shifts of the input up to {_MAX_MULTIPLE} pixels along "
        f"its {'width' if axis == 3 else 'height'}: pass multiple= (the network's total stride)"
    )
