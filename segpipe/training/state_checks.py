"""What a training state file (``epoch-NNN.state.pt``) must hold to be resumed: the entries
:func:`~segpipe.training.state.save_state` writes, of their kinds; the state of the weights
beside it; and an optimiser and schedule this run's would be at its step."""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from segpipe.analysis.scores import Evaluation
from segpipe.models.checkpoint import CheckpointError, fingerprint, read_payload

if TYPE_CHECKING:
    from segpipe.training.config import TrainConfig

__all__ = ["check_optimiser_state", "read_state"]

_STATE_ENTRIES = (
    "step",
    "optimizer",
    "scheduler",
    "numpy_rng",
    "torch_rng",
    "train_seconds",
    "loss_history",
    "window_losses",
    "epochs",
)


def read_state(state_file: Path, saved: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """The state file's dict, its ``epochs`` and ``evaluation`` decoded (``evaluation`` None
    where the file predates it), checked to be the state of ``saved``, the checkpoint beside
    it; CheckpointError naming the file."""
    state = read_payload(state_file)  # whole and undamaged, or CheckpointError naming it
    missing = [k for k in _STATE_ENTRIES if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"cannot resume: {state_file} lacks the entries {missing} of a training state "
            "(segpipe.training.train writes them)"
        )
    try:
        decoded = {"epochs": json.loads(state["epochs"]), "evaluation": None}
        if "evaluation" in state:
            decoded["evaluation"] = json.loads(state["evaluation"])
            Evaluation.from_dict(decoded["evaluation"])
        if "machines" in state:  # a list of {"threads", "cpu"} (or None: unknown)
            decoded["machines"] = [dict(m) if m else None for m in json.loads(state["machines"])]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"cannot resume from {state_file}: its epochs or evaluation are not what "
            f"segpipe.training.train writes ({err!r})"
        ) from err
    state = {**state, **decoded}
    if odd := _odd_entries(state, config.steps):
        raise CheckpointError(
            f"cannot resume from {state_file}: it holds {', '.join(odd)}, where "
            f"segpipe.training.train writes a step from 0 to {config.steps}, train_seconds "
            ">= 0, lists of losses and a list of epochs; the file was edited or is no state"
        )
    # A state beside another epoch's or run's weights would restore its step, history and
    # scores onto them: a run that trains nothing, or an epoch twice, and reports wrongly.
    metrics = getattr(saved, "checkpoint_metrics", None) or {}
    step, epoch = metrics.get("step"), metrics.get("epoch")
    if step is not None and (state["step"], len(state["epochs"])) != (step, epoch):
        raise CheckpointError(
            f"cannot resume from {state_file}: it is the state at step {state['step']}, epoch "
            f"{len(state['epochs'])}; its checkpoint holds the weights of step {step}, epoch "
            f"{epoch}. {_ONE_PAIR}"
        )
    weights = fingerprint(saved)
    if state.get("fingerprint", weights) != weights:  # states written before it: unchecked
        raise CheckpointError(
            f"cannot resume from {state_file}: it was written with other weights than its "
            f"checkpoint's (their fingerprints differ). {_ONE_PAIR}"
        )
    return state


_ONE_PAIR = "Resume from an epoch-NNN.pt and the epoch-NNN.state.pt its run wrote with it"


def _odd_entries(state: dict[str, Any], steps: int) -> list[str]:
    """``name=value`` of each decoded entry unlike what a run of ``steps`` steps writes."""

    def is_number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and -math.inf < v < math.inf

    step, seconds = state["step"], state["train_seconds"]
    is_right = {
        "step": isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= steps,
        "train_seconds": is_number(seconds) and seconds >= 0,
        "loss_history": isinstance(state["loss_history"], list)
        and all(is_number(v) for v in state["loss_history"]),
        "window_losses": isinstance(state["window_losses"], list)
        and all(is_number(v) for v in state["window_losses"]),
        "epochs": isinstance(state["epochs"], list)
        and all(isinstance(e, dict) for e in state["epochs"]),
    }
    return [f"{name}={reprlib.repr(state[name])}" for name, ok in is_right.items() if not ok]


# Adam's settings a run builds from its config; the learning rate is the schedule's, checked
# against it. Keys an older torch did not save are not compared.
_ADAM_SETTINGS = ("initial_lr", "betas", "eps", "weight_decay", "amsgrad")


def check_optimiser_state(
    state_file: Path,
    saved: tuple[Any, Any],
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """CheckpointError naming ``state_file`` where its ``saved`` (optimiser, schedule) states
    are not what this run's ``optimiser`` and ``schedule`` (as built, before any step) would be
    at its step: moments of other shapes than the parameters, other Adam settings, another
    schedule, or a learning rate off it. torch restores all of these unchecked: a moment of
    another shape failed at the first step, naming no file, and an edited rate trained on."""
    odd: list[str] = []
    try:
        opt, sched = saved
        params = [p for group in optimiser.param_groups for p in group["params"]]
        for index, entry in opt["state"].items():
            for name, value in entry.items():
                shape = tuple(params[index].shape)
                if torch.is_tensor(value) and value.ndim and tuple(value.shape) != shape:
                    odd.append(f"{name} of parameter {index} of shape {tuple(value.shape)}")
        fresh = schedule.state_dict()
        cosine = isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR)
        settings = ("T_max", "eta_min", "base_lrs") if cosine else ("base_lrs",)
        odd += [f"{k}={sched[k]!r}" for k in settings if sched[k] != fresh[k]]
        built = optimiser.state_dict()["param_groups"]
        for group, own in zip(opt["param_groups"], built, strict=True):
            odd += [
                f"{k}={group[k]!r}"
                for k in _ADAM_SETTINGS
                if k in group and k in own and _plain(group[k]) != _plain(own[k])
            ]
            if cosine:  # the rate its step is due, in closed form
                base, low, t = own["initial_lr"], fresh["eta_min"], sched["last_epoch"]
                due = low + (base - low) * (1 + math.cos(math.pi * t / fresh["T_max"])) / 2
                if not math.isclose(group["lr"], due, rel_tol=1e-6, abs_tol=1e-6 * base):
                    odd.append(f"lr={group['lr']!r} at step {t} (the schedule's: {due!r})")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        odd.append(repr(err))
    if odd:
        raise CheckpointError(
            f"cannot resume from {state_file}: its optimiser or schedule is not this run's "
            f"({'; '.join(odd)}); the file was edited or is another run's"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
