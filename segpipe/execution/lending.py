"""A caller's module lent to this process's predictors, and given back as it was.

A :class:`~segpipe.execution.predictor.Predictor` puts the module it runs in eval mode, on its
device, channels-last; a run lends it the caller's module (not a copy) for that, and gives it
back when the last run holding it ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["model_given_back"]

# The callers' modules lent to predictors of this process, by id: holders, how to give each
# back, and the device the holders run it on. Runs side by side may share one (an archive's
# images, one loaded model): the last to end gives it back, not the first, under another's
# forward passes.
_LENT: dict[int, tuple[int, Callable[[], None], torch.device | None]] = {}
_LENT_LOCK = threading.Lock()


@contextlib.contextmanager
def model_given_back(model: nn.Module, device: torch.device | None = None) -> Iterator[nn.Module]:
    """``model``, for this process's predictors to put in eval mode, on their ``device``,
    channels-last; given back as it was when the last run holding it ends, however it ends:
    every submodule's mode, every parameter's, gradient's and buffer's device and layout.

    Not a copy: that would hold a CUDA model twice on its GPU while the run measures its
    free memory, and fail on modules that cannot be copied (a lock, an open file). So runs
    sharing it must share its device: another is refused (ValueError), as each run would
    move it from under the other's forward passes.
    """
    if device is not None and device.type == "cuda" and device.index is None:
        # "cuda" is "cuda:0" there; with no GPU the run's predictor refuses it, naming where
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        device = torch.device("cuda", index)
    with _LENT_LOCK:
        holders, give_back, on = _LENT.get(id(model), (0, None, device))
        if holders and device is not None and on is not None and device != on:
            raise ValueError(
                f"this {type(model).__name__} module is in use by another run in this process "
                f"on {on}, and this run asks for {device}: one module cannot run on two "
                "devices at once; give this run a copy (copy.deepcopy) or the same device"
            )
        _LENT[id(model)] = (holders + 1, give_back or _as_it_is(model), on or device)
    try:
        yield model
    finally:
        with _LENT_LOCK:  # a run starting meanwhile must not record the lent state
            holders, give_back, on = _LENT.pop(id(model))
            if holders > 1:
                _LENT[id(model)] = (holders - 1, give_back, on)
            else:
                give_back()


def _as_it_is(model: nn.Module) -> Callable[[], None]:
    """What puts ``model`` back as it is now (:func:`model_given_back`)."""
    modes = [(m, m.training) for m in model.modules()]
    # Module.to converts each parameter's data in place (the caller's optimizer keeps its
    # parameters), its gradient's too, and replaces the buffers: put back by name.
    layouts = [
        (m, name, grad, t.device, t.stride())
        for m in model.modules()
        for name, p in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        for grad, t in ((False, p), (True, p.grad))
        if t is not None
    ]

    def give_back() -> None:
        for m, training in modes:
            m.training = training
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as in __init__
            for m, name, grad, device, stride in layouts:
                t = getattr(m, name).grad if grad else getattr(m, name)
                if t is not None and (t.device != device or t.stride() != stride):
                    was = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=device)
                    t.data = was.copy_(t)

    return give_back
