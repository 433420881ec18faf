"""The state a training run writes beside each epoch checkpoint, and resuming from it.

After each epoch :func:`segpipe.training.train` writes ``epoch-NNN.pt`` (the model,
:func:`segpipe.models.save`) and beside it ``epoch-NNN.state.pt`` (:func:`state_path`): the
optimiser and schedule, both random generators, the step, the time spent and the loss and epoch
history, so that a run resumed from it ends with the same weights as an uninterrupted one.
Tensors and plain data only, so both files load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from segpipe.training.config import TrainConfig

__all__ = ["load_state", "save_state", "state_path"]


def state_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The optimiser state written beside a training checkpoint: ``x.pt`` -> ``x.state.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".pt") + ".state.pt")


def save_state(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    config: TrainConfig,
    step: int,
    seconds: float,
    history: list[float],
    window_losses: list[float],
    epochs: list[dict[str, Any]],
) -> Path:
    """``epoch-NNN.pt`` (the model, :func:`segpipe.models.save`) and ``epoch-NNN.state.pt``
    (everything else a resume needs; tensors and plain data, so weights-only loadable)."""
    from segpipe import models

    if not isinstance(model, models.SegmentationModel):
        raise TypeError(
            f"checkpoints need a segpipe model (segpipe.models.build), got {type(model).__name__}"
        )
    path = Path(str(config.checkpoint_dir)) / f"epoch-{len(epochs):03d}.pt"
    models.save(model, path, metrics={**epochs[-1], "config": asdict(config)})
    torch.save(
        {
            "step": step,
            "optimizer": optimiser.state_dict(),
            "scheduler": schedule.state_dict(),
            # PCG64's state holds 128-bit integers: kept as JSON text.
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "train_seconds": seconds,
            "loss_history": list(history),
            "window_losses": list(window_losses),
            "epochs": json.dumps(epochs),
        },
        state_path(path),
    )
    return path


def load_state(
    checkpoint: str,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Restore ``model``, ``optimiser``, ``schedule`` and ``rng`` (and torch's random state) from
    ``checkpoint`` and its :func:`state_path`; return that state, its ``epochs`` decoded."""
    from segpipe import models

    state_file = state_path(checkpoint)
    if not state_file.is_file():
        raise FileNotFoundError(
            f"cannot resume from {checkpoint}: its optimiser state {state_file} is missing "
            "(resume needs a checkpoint written by segpipe.training.train)"
        )
    model.load_state_dict(models.load(checkpoint).state_dict(), strict=True)
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    optimiser.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    torch.set_rng_state(state["torch_rng"])
    return {**state, "epochs": json.loads(state["epochs"])}
