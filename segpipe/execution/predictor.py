"""Running a model on batches of windows: pixels in, class probabilities out.

Pure torch and numpy; knows nothing of files, Dask or Prefect. Whatever turns windows into
probabilities is a :data:`WindowPredictor`; there are two:

* :class:`Predictor`, one per worker process: it holds the model on its device (channels-last,
  autocast on GPUs) and tasks call it with stacked windows;
* :func:`window_probabilities` runs a model as it is, where it is, in float32: for in-memory
  prediction during training, which must not move, convert or re-mode the model it trains.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from segpipe.execution.allocator import keep_freed_memory
from segpipe.geometry.pixels import to_float01
from segpipe.models import geometry_of, pixel_contract_of
from segpipe.models.contract import scaling_affine

__all__ = [
    "CPU_FORWARD_BUDGET",
    "SHARING_ENV",
    "InferenceConfig",
    "PendingProbabilities",
    "Predictor",
    "WindowPredictor",
    "activation_bytes_per_pixel",
    "autocast_dtype",
    "is_out_of_memory",
    "missing_device",
    "resolve_device",
    "window_probabilities",
]

WindowPredictor = Callable[[np.ndarray], np.ndarray]
"""``(N, Y, X, C)`` pixels of any dtype ``pixels.to_float01`` knows -> ``(N, classes, y, x)``
float32 softmax probabilities over the model's whole output, ``y = geometry.output_size(Y)``,
in a new array each call (an exact sink keeps a view of it, not a copy)."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) is the first CUDA GPU when there is one, else the CPU.

    Raises RuntimeError for a device this process lacks (:func:`missing_device`)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if (missing := missing_device(dev)) is not None:
        raise RuntimeError(f"device {str(device)!r} asked for, but {missing}")
    return dev


def missing_device(device: str | torch.device) -> str | None:
    """Why torch in this process cannot run on ``device`` (not "auto"), or None when it can."""
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "torch sees no CUDA GPU"
        if dev.index is not None and dev.index >= count:
            return f"torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return "torch sees no Apple MPS device"
    return None


@dataclass(frozen=True)
class InferenceConfig:
    """How a worker runs its model.

    device: "auto", "cpu", "cuda", "cuda:1"...
    batch_size: windows per forward pass.
    amp: autocast (bfloat16 where the GPU has it, else float16); None means on for CUDA, off
        for the CPU (exact float32 there).
    threads: torch intra-op threads on the CPU (None leaves torch's default).
    """

    device: str = "auto"
    batch_size: int = 4
    amp: bool | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        # torch's own refusal names no setting, and comes once the run has made its result
        if self.threads is not None and not (type(self.threads) is int and self.threads >= 1):
            raise ValueError(f"threads must be a whole number >= 1 or None, got {self.threads!r}")


class Predictor:
    """A model ready for inference on one device.

    ``predictor(windows)`` takes (N, Y, X, C) pixels of any dtype ``pixels.to_float01`` knows
    and returns (N, classes, y, x) float32 softmax probabilities over the model's whole output,
    ``y = geometry.output_size(Y)``; the caller crops what it uses (``Window.crop``).

    The call is two steps a pipeline runs in different threads: :meth:`prepare` (in an I/O
    thread: uint8 pixels kept as they are, other dtypes scaled to float32) and :meth:`forward`
    (host to device, uint8 scaled there, the model, softmax, and back; it returns a
    :class:`PendingProbabilities` that on a GPU is still being copied back when the call
    returns, so the model thread can start the next batch).
    """

    def __init__(self, model: torch.nn.Module, config: InferenceConfig | None = None) -> None:
        self.config = config or InferenceConfig()
        self.device = resolve_device(self.config.device)
        self.found_threads = torch.get_num_threads()  # before ``threads`` sets its own
        if self.device.type == "cpu":
            keep_freed_memory()
            if self.config.threads:
                torch.set_num_threads(self.config.threads)
        self.geometry = geometry_of(model)
        self.contract = pixel_contract_of(model)  # what its float pixels mean (stitching)
        self.scale = _scaler(model)
        self._uint8_scaling = _uint8_scaling(model, self.device)
        self.amp = self.config.amp if self.config.amp is not None else self.device.type == "cuda"
        self.amp_dtype = autocast_dtype(self.device, self.amp)
        # Outside inference mode whatever the caller's: a lent module's new parameters must
        # stay ordinary tensors its next backward can save. torch's stubs leave memory_format
        # out of Module.to; the call accepts it.
        with torch.inference_mode(False):
            self.model = model.eval().to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        # A stream of its own on a GPU: copies and kernels of batch n+1 queue up behind
        # batch n's without waiting for the host to read n's probabilities.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.stream is not None:
            # The weights' copies (and a lent module's last optimiser kernels) were queued on
            # the current stream: the first batches must not read them before they land.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        if windows.ndim != 4:
            raise ValueError(f"windows must be (N, Y, X, C), got shape {windows.shape}")
        step = self.config.batch_size
        pending = [
            self.forward(self.prepare(windows[i : i + step])) for i in range(0, len(windows), step)
        ]
        return np.concatenate([p.result() for p in pending], axis=0)

    def prepare(self, windows: np.ndarray) -> np.ndarray:
        """(N, Y, X, C) pixels -> contiguous model input: uint8 as they are (:meth:`forward`
        scales them on the device, from a quarter of the bytes), any other dtype as float32
        in the model's input scale."""
        if windows.ndim != 4:
            raise ValueError(f"windows must be (N, Y, X, C), got shape {windows.shape}")
        if windows.dtype == np.uint8:
            return np.ascontiguousarray(windows)
        return np.ascontiguousarray(self.scale(windows))

    @torch.inference_mode()
    def forward(self, batch: np.ndarray) -> PendingProbabilities:
        """Run the model on prepared ``(N, Y, X, C)`` windows (:meth:`prepare`: uint8, or
        float32 already scaled)."""
        x = torch.from_numpy(batch)
        if self.stream is None:  # the CPU's (``to`` is nothing there), or another device's
            return PendingProbabilities(self._probabilities(x.to(self.device)).cpu(), None)
        with torch.cuda.stream(self.stream):
            # Pinned host memory (torch's caching host allocator keeps it until the copy is
            # done) lets the copy run asynchronously, overlapped with other batches' compute.
            staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            staged.copy_(x)
            probabilities = self._probabilities(staged.to(self.device, non_blocking=True))
            host = torch.empty(probabilities.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(probabilities, non_blocking=True)
            done = torch.cuda.Event(blocking=True)  # result() sleeps, not spins a core
            done.record(self.stream)
        return PendingProbabilities(host, done)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            # The scaler's float32 arithmetic, bit for bit: (x - lo) / span, per channel (not
            # a scalar divisor, which a GPU would turn into a product by its reciprocal).
            lo, span = self._uint8_scaling
            x = x.to(torch.float32).sub_(lo).div_(span)
        # (N, Y, X, C) permuted to (N, C, Y, X) is already channels-last in memory.
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        enabled = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled):
            logits = self.model(x)
        return _softmax(logits)

    def bytes_per_pixel(self, channels: int) -> float:
        """Activation bytes per input pixel of one forward pass over windows of ``channels``
        (an upper bound: the sum of every layer's output, measured on a small window once
        per module, device and channel count in this process: its later runs, an archive's
        images, ask again for nothing while the module's layers and tensors keep their
        shapes)."""
        key = (str(self.device), channels, _structure(self.model))
        with _PROBES_LOCK:  # the first tasks of a run ask at once: probe once
            probes = _PROBES.setdefault(self.model, {})
            if key not in probes:
                probes[key] = activation_bytes_per_pixel(self.model, self.device, channels)
            return probes[key]

    def memory_budget(self) -> int:
        """Bytes of activations the forward passes running at once may take: 40% of the GPU's
        free memory (one pass at a time, two batches in flight; split between the worker
        processes sharing the GPU, :data:`SHARING_ENV`), or
        :data:`CPU_FORWARD_BUDGET` on the CPU (``ModelStage`` splits it between passes side
        by side)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # What this process's allocator caches unused is free to it too: without it each
            # run here could find less than the one before (its cache holds what they freed),
            # and cut its exact windows smaller, in shapes new to cuDNN (a shape's first pass
            # took 30-40 ms on an H200, later ones 2 ms) and with other bits.
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
                self.device
            )
            # Worker processes sharing the GPU measure the same free memory at their start.
            return int((free + cached) * 0.4) // max(1, int(os.environ.get(SHARING_ENV) or 1))
        return CPU_FORWARD_BUDGET


# Probes of modules by what sets their activations (``Predictor.bytes_per_pixel``): 14-25 ms
# a run on 2 cores for the U-Net of ``benchmarks/throughput.py``'s blend rows.
_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], float]] = (
    weakref.WeakKeyDictionary()
)
_PROBES_LOCK = threading.Lock()


def _structure(model: nn.Module) -> tuple[object, ...]:
    """What sets ``model``'s activations, as far as the module shows it: its layers' types,
    its tensors' shapes and dtypes (not a setting its ``forward`` reads from an attribute)."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return (
        *((name, type(m)) for name, m in model.named_modules()),
        *((name, tuple(t.shape), t.dtype) for name, t in tensors),
    )


CPU_FORWARD_BUDGET = 2 << 30
"""Bytes of activations the CPU's forward passes may take together (2 GiB: on 2 cores, two
1024 px exact windows of the shipped U-Net side by side, one core each)."""

SHARING_ENV = "SEGPIPE_PROCESSES_PER_GPU"
"""Environment variable: how many worker processes share this process's GPU (a local
cluster's, ``execution.plans``); each budgets that part of the free memory."""


class PendingProbabilities:
    """Probabilities of one batch, possibly still on their way from the device."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        self._host = host
        self._done = done

    def is_ready(self) -> bool:
        """Whether :meth:`result` would return at once."""
        return self._done is None or bool(self._done.query())

    def result(self) -> np.ndarray:
        """(N, classes, y, x) float32, once the copy back has finished."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of a forward pass, None for plain float32.

    On CUDA bfloat16 where ``device`` has bfloat16 units (compute capability 8.0, Ampere, and
    later; ROCm), else float16: ``torch.cuda.is_bf16_supported()`` asks about the current
    device and by default also says yes where bfloat16 is only emulated (a T4, a V100), far
    slower. On the CPU only when asked (``amp=True``): most CPUs lack bfloat16 units too.
    """
    if not amp:
        return None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        native = bool(torch.version.hip) or torch.cuda.get_device_properties(index).major >= 8
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16


@torch.inference_mode()
def activation_bytes_per_pixel(model: nn.Module, device: torch.device, channels: int) -> float:
    """Sum of the output bytes of every leaf layer per input pixel, from one small forward
    over ``channels`` channels (the image's the model takes: a module need not say its own)."""
    geometry = geometry_of(model)
    side = geometry.input_size(8 * geometry.multiple)
    total = 0
    # The hooks are on a module runs side by side may share: count this thread's pass only,
    # not another run's forward on its model thread meanwhile.
    prober = threading.get_ident()

    def count(module: nn.Module, args: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor) and threading.get_ident() == prober:
            total += output.numel() * output.element_size()

    # TorchScript modules take no hooks (a wrapped TorchScript file counts only what it returns)
    leaves = [
        m
        for m in model.modules()
        if not list(m.children()) and not isinstance(m, torch.jit.ScriptModule)
    ]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        model(torch.zeros((1, channels, side, side), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return max(total / side**2, 4.0)


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
    x = torch.from_numpy(np.ascontiguousarray(_scaler(model)(windows).transpose(0, 3, 1, 2)))
    weight = next(model.parameters(), None)
    return _softmax(model(x if weight is None else x.to(weight.device))).cpu().numpy()


def _scaler(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """The one pixel scaling: the model's pixel contract (what it was trained on), else the
    dtype rule (``pixels.to_float01``)."""
    contract = pixel_contract_of(model)
    return to_float01 if contract is None else contract.scale


def _uint8_scaling(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, span)`` on ``device``: :func:`_scaler` of uint8 pixels is ``(x - lo) / span``."""
    lo, span = scaling_affine(pixel_contract_of(model), np.uint8)
    return torch.from_numpy(lo).to(device), torch.from_numpy(span).to(device)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``(N, classes, y, x)`` logits, where they are."""
    # In float32 whatever autocast did: low-precision probabilities lose the small classes.
    return torch.softmax(logits.float(), dim=1)


# torch's CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate
# memory"), a GPU's an OutOfMemoryError, numpy a MemoryError.
_OUT_OF_MEMORY_TEXT = ("can't allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` says memory ran out (host or device): what fewer or smaller windows
    may not meet again."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    # any type: a model wrapper's or TorchScript's error may carry the allocator's text
    return exc is not None and any(t in str(exc).lower() for t in _OUT_OF_MEMORY_TEXT)
