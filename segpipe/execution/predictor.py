"""Running a model on batches of windows: pixels in, class probabilities out.

Pure torch and numpy; knows nothing of files, Dask or Prefect. Whatever turns windows into
probabilities is a :data:`WindowPredictor`; there are two:

* :class:`Predictor`, one per worker process: it holds the model on its device (channels-last,
  autocast on GPUs) and tasks call it with stacked windows;
* :func:`window_probabilities` runs a model as it is, where it is, in float32: for in-memory
  prediction during training, which must not move, convert or re-mode the model it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from segpipe.geometry.pixels import to_float01
from segpipe.models import geometry_of

__all__ = [
    "InferenceConfig",
    "Predictor",
    "WindowPredictor",
    "resolve_device",
    "window_probabilities",
]

WindowPredictor = Callable[[np.ndarray], np.ndarray]
"""``(N, Y, X, C)`` pixels of any dtype ``pixels.to_float01`` knows -> ``(N, classes, y, x)``
float32 softmax probabilities over the model's whole output, ``y = geometry.output_size(Y)``."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) is the first CUDA GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return dev


@dataclass(frozen=True)
class InferenceConfig:
    """How a worker runs its model.

    device: "auto", "cpu", "cuda", "cuda:1"...
    batch_size: windows per forward pass.
    amp: autocast to bfloat16; None means on for CUDA, off for the CPU (exact float32 there).
    threads: torch intra-op threads on the CPU (None leaves torch's default).
    """

    device: str = "auto"
    batch_size: int = 4
    amp: bool | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class Predictor:
    """A model ready for inference on one device.

    ``predictor(windows)`` takes (N, Y, X, C) pixels of any dtype ``pixels.to_float01`` knows
    and returns (N, classes, y, x) float32 softmax probabilities over the model's whole output,
    ``y = geometry.output_size(Y)``; the caller crops what it uses (``Window.crop``).
    """

    def __init__(self, model: torch.nn.Module, config: InferenceConfig | None = None) -> None:
        self.config = config or InferenceConfig()
        self.device = resolve_device(self.config.device)
        if self.config.threads and self.device.type == "cpu":
            torch.set_num_threads(self.config.threads)
        self.geometry = geometry_of(model)
        self.amp = self.config.amp if self.config.amp is not None else self.device.type == "cuda"
        # torch's stubs leave memory_format out of Module.to; the call accepts it
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        if windows.ndim != 4:
            raise ValueError(f"windows must be (N, Y, X, C), got shape {windows.shape}")
        outs = [
            self._forward(windows[i : i + self.config.batch_size])
            for i in range(0, len(windows), self.config.batch_size)
        ]
        return np.concatenate(outs, axis=0)

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(to_float01(batch)))
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with the previous batch's compute.
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x)
        return _softmax(logits)


@torch.inference_mode()
def window_probabilities(model: nn.Module, windows: np.ndarray) -> np.ndarray:
    """One forward pass of ``model`` as it is over ``(N, Y, X, C)`` windows: a
    :data:`WindowPredictor` (bind the model with ``functools.partial``).

    Unlike :class:`Predictor` it leaves the model alone (device, memory format, train/eval
    mode) and feeds it contiguous ``(N, C, Y, X)`` float32 on the model's device, no
    autocast: training validates with it, and converting the model it trains would change
    the following steps' arithmetic. Returns ``(N, classes, y, x)`` float32 on the CPU.
    """
    if windows.ndim != 4:
        raise ValueError(f"windows must be (N, Y, X, C), got shape {windows.shape}")
    x = torch.from_numpy(np.ascontiguousarray(to_float01(windows).transpose(0, 3, 1, 2)))
    weight = next(model.parameters(), None)
    return _softmax(model(x if weight is None else x.to(weight.device)))


def _softmax(logits: torch.Tensor) -> np.ndarray:
    # Softmax in float32 whatever autocast did: bf16 probabilities lose the small classes.
    return torch.softmax(logits.float(), dim=1).cpu().numpy()
