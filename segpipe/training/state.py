"""The state a training run writes beside each epoch checkpoint, and resuming from it.

After each epoch :func:`segpipe.training.train` writes ``epoch-NNN.pt`` (the model,
:func:`segpipe.models.save`) and beside it ``epoch-NNN.state.pt`` (:func:`state_path`): the
optimiser and schedule, both random generators, the step, the time spent and the loss and epoch
history, so that a run resumed from it ends with the same weights as an uninterrupted one.
Tensors and plain data only, so both files load with ``weights_only=True``. The state keeps
the epoch's validation too, so a run resumed from its last checkpoint, with nothing left to
train, returns what the run returned when it ended; and the checkpoint's
:func:`~segpipe.models.fingerprint`, so that, with the step and epoch count the checkpoint
records, :func:`load_state` never restores a state beside other weights than its own.

A resume continues the run it comes from: :func:`load_state` refuses a config whose training
settings differ from those the checkpoint records (all but :data:`RESUME_MAY_CHANGE`). By the
same rule, :func:`check_checkpoint_dir` keeps a run from writing over another run's files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from segpipe.atomic import check_writable, replaced_file
from segpipe.models.checkpoint import CheckpointError, fingerprint
from segpipe.training.state_checks import check_optimiser_state, read_state

if TYPE_CHECKING:
    from segpipe.analysis.evaluation import LabelledImage
    from segpipe.training.config import TrainConfig

__all__ = [
    "RESUME_MAY_CHANGE",
    "check_checkpoint_dir",
    "data_fingerprint",
    "load_state",
    "save_state",
    "state_path",
]

# The TrainConfig fields a resumed run may set otherwise than the run it continues: where it
# writes, what it resumes from, what it shows, and how many CPU threads compute (another count,
# like another machine, may round the last bits differently but computes the same thing). Every
# other field changes the data, the batches, the loss, the schedule or the validation: a
# different value would silently mix two runs (e.g. a longer `steps` keeps the saved cosine
# schedule's length, and a new `lr` loses to the saved optimiser's).
RESUME_MAY_CHANGE = ("checkpoint_dir", "resume_from", "progress", "num_threads")


def state_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The optimiser state written beside a training checkpoint: ``x.pt`` -> ``x.state.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".pt") + ".state.pt")


def check_checkpoint_dir(config: TrainConfig, done: int) -> None:
    """Refuse, before training, to write over another run's epoch checkpoints.

    A run ``done`` epochs in writes ``epoch-NNN.pt`` for the epochs after; each that exists
    already in ``config.checkpoint_dir`` must be the resumed run's (its recorded settings
    those of ``config``, as :func:`load_state` compares them), else ValueError naming the folder.
    """
    from segpipe import models

    if not config.checkpoint_dir:
        return
    folder = Path(config.checkpoint_dir)
    # Here, not at the first epoch's end: a run of one epoch saved its model after that.
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"checkpoint_dir {folder} (--checkpoint-dir) is a file: name a folder for the "
            "epoch checkpoints"
        )
    check_writable(folder)
    for epoch in range(done + 1, math.ceil(config.steps / config.steps_per_epoch) + 1):
        path = folder / f"epoch-{epoch:03d}.pt"
        found = next((p for p in (path, state_path(path)) if p.exists()), None)
        if found is None:
            continue
        why = "of another training run, or of an earlier one with these settings"
        if config.resume_from and path.is_file():
            try:
                # Building the model draws its initial weights from torch's generator, which
                # the resumed run has just restored: its dropout masks would be another run's.
                with torch.random.fork_rng(devices=[]):
                    recorded = models.load(path).checkpoint_metrics or {}
                differ = _differences(recorded.get("config"), config)
            except ValueError as err:  # CheckpointError, or no checkpoint at all
                differ, why = None, f"which is no checkpoint of this run ({err})"
            if differ == []:
                continue  # the resumed run's own: it writes the same again
            if differ:
                why = "of another run: it trained with " + ", ".join(
                    f"{n}={old!r}" for n, old, _ in differ
                )
        raise ValueError(
            f"{folder} already holds {found.name}, {why}; this run would write over it. Give "
            "another checkpoint_dir (segpipe train --checkpoint-dir), or continue that run "
            "from its last checkpoint (resume_from, --resume)"
        )


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
    evaluation: dict[str, Any],
    *,
    data_sha256: str,
    machines: list[Any] | None = None,
) -> Path:
    """``epoch-NNN.pt`` (the model, :func:`segpipe.models.save`) and ``epoch-NNN.state.pt``
    (everything else a resume needs, ``evaluation``, the epoch's validation as
    ``Evaluation.as_dict()``, and ``data_sha256``, the :func:`data_fingerprint` of the run's
    images; tensors and plain data, so weights-only loadable)."""
    from segpipe import models

    if not isinstance(model, models.SegmentationModel):
        raise TypeError(
            f"checkpoints need a segpipe model (segpipe.models.build), got {type(model).__name__}"
        )
    path = Path(str(config.checkpoint_dir)) / f"epoch-{len(epochs):03d}.pt"
    models.save(model, path, metrics={**epochs[-1], "config": asdict(config)})
    _save_atomic(
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
            "evaluation": json.dumps(evaluation),
            "fingerprint": fingerprint(model),
            "data_sha256": data_sha256,
            # thread counts and CPU instruction sets the run has trained on so far
            "machines": json.dumps(machines or []),
        },
        state_path(path),
    )
    return path


def data_fingerprint(*datasets: Sequence[LabelledImage]) -> str:
    """sha256 of the pixels, labels and instances (with their dtypes and shapes) of each image
    of ``datasets`` in order: a run resumed on other images would mix two runs."""
    digest = hashlib.sha256()
    for data in datasets:
        digest.update(b"dataset")
        for item in data:
            for array in (item.image, item.labels, item.instances):
                if array is None:
                    digest.update(b"none")
                    continue
                array = np.ascontiguousarray(array)
                digest.update(f"{array.dtype.str}{array.shape}".encode())
                digest.update(array.data)
    return digest.hexdigest()


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` whole or not at all, as :func:`segpipe.models.save` writes:
    a kill mid-write must leave the previous state (a resume's) readable, not a torn file."""
    try:
        with replaced_file(path) as part:
            torch.save(payload, part)
    except RuntimeError as err:  # torch's writer reports a full disk so (OSErrors name path)
        raise CheckpointError(f"{path} cannot be written: {err}") from err


def load_state(
    checkpoint: str,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    config: TrainConfig,
    *,
    data_sha256: str,
) -> dict[str, Any]:
    """Restore ``model``, ``optimiser``, ``schedule`` and ``rng`` (and torch's random state) from
    ``checkpoint`` and its :func:`state_path`; return that state, its ``epochs`` (and its
    ``evaluation``, None in files written before it was kept) decoded.

    Raises ValueError when ``config`` differs from the checkpoint's run in a setting outside
    :data:`RESUME_MAY_CHANGE`, and :class:`~segpipe.models.CheckpointError` naming the file
    when either file cannot be read, the state holds entries of other kinds than
    :func:`save_state` writes or is not the checkpoint's (another step, epoch count or
    fingerprint), its run trained on other images than those ``data_sha256``
    (:func:`data_fingerprint`) is of, the weights do not fit ``model``, or its class names,
    input normalisation or pixel contract differ from the checkpoint's (all checked before
    anything is restored).
    """
    from segpipe import models

    state_file = state_path(checkpoint)
    if not Path(checkpoint).exists():  # not its state's fault (a typo, a cleaned folder)
        raise FileNotFoundError(f"cannot resume from {checkpoint}: no such file")
    if not state_file.is_file():
        raise FileNotFoundError(
            f"cannot resume from {checkpoint}: its optimiser state {state_file} is missing "
            f"({_without_state(Path(checkpoint))})"
        )
    saved = models.load(checkpoint)
    _check_settings(checkpoint, (saved.checkpoint_metrics or {}).get("config"), config)
    state = read_state(state_file, saved, config)
    if state.get("data_sha256", data_sha256) != data_sha256:  # states before it: unchecked
        data = (
            f"the images of {config.train_folder} and {config.val_folder} changed"
            if config.dataset == "folder"
            else f"this release makes other {config.dataset} scenes of the same seeds"
        )
        raise CheckpointError(
            f"cannot resume from {state_file}: its run trained on other images than this one "
            f"would ({data} since it was written); resume on that run's images, or train anew"
        )
    mismatch = (
        f"cannot resume from {checkpoint}: it holds {_architecture(saved)}, the model to "
        f"train is {_architecture(model)}; build the model as that run did"
    )
    # Same-shaped weights can belong to another model (padding, dropout): compare configs.
    if isinstance(model, models.SegmentationModel) and _architecture(model) != _architecture(saved):
        raise CheckpointError(mismatch)
    # The same weights fed other pixels (normalisation, scaling) or naming other classes
    # would train another model than the run's, and save it under the wrong contract.
    differ = [
        (name, old, new)
        for name, old, new in ((n, _io_of(saved, n), _io_of(model, n)) for n in _MODEL_IO)
        if old is not None and new != old and isinstance(model, models.SegmentationModel)
    ]
    if differ:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: its model has "
            + ", ".join(f"{name}={old!r}" for name, old, _ in differ)
            + "; the model to train has "
            + ", ".join(f"{name}={new!r}" for name, _, new in differ)
            + ". Build the model as that run did (class names, input_mean, input_std), on "
            "training images of the same pixels"
        )
    try:
        model.load_state_dict(saved.state_dict(), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{mismatch} ({err})") from err
    check_optimiser_state(state_file, (state["optimizer"], state["scheduler"]), optimiser, schedule)
    try:
        optimiser.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"cannot resume from {state_file}: its state does not fit this run ({err!r}); "
            "resume needs the state segpipe.training.train wrote beside the checkpoint"
        ) from err
    return state


def _without_state(checkpoint: Path) -> str:
    """Why an epoch checkpoint may lack its state: a run killed between the two files."""
    n = checkpoint.stem.removeprefix("epoch-")
    before = checkpoint.with_name(f"epoch-{int(n) - 1:03d}.pt") if n.isdigit() else checkpoint
    if before != checkpoint and state_path(before).is_file():
        return f"its run stopped before writing it; resume from {before}"
    return "resume needs a checkpoint written by segpipe.training.train"


# What models.save records beside the architecture: how pixels become input, what comes out.
_MODEL_IO = ("class_names", "input_mean", "input_std", "pixel_contract")


def _io_of(model: nn.Module, name: str) -> Any:
    """``model``'s ``name`` (:data:`_MODEL_IO`) as plain data; None where it has none."""
    value: Any = getattr(model, name, None)
    return _plain(value.as_dict() if hasattr(value, "as_dict") else value)


def _architecture(model: nn.Module) -> str:
    """``'unet' model with {config}`` (plain data, as a checkpoint holds it), or the class."""
    config = getattr(model, "config", None)
    if not is_dataclass(config) or isinstance(config, type):
        return f"a {type(model).__name__}"
    return f"a {getattr(model, 'name', type(model).__name__)!r} model with {_plain(asdict(config))}"


def _plain(value: Any) -> Any:
    """``value`` as it comes back from JSON, or from a checkpoint's metrics: lists for tuples."""
    return json.loads(json.dumps(value))


def _differences(saved: Any, config: TrainConfig) -> list[tuple[str, Any, Any]] | None:
    """``(name, saved, config's)`` of each setting outside :data:`RESUME_MAY_CHANGE` that differs
    from ``saved`` (``asdict`` as a checkpoint holds it); None when ``saved`` is no config."""
    if not isinstance(saved, dict):
        return None
    wanted = _plain(asdict(config))
    # A field added since the checkpoint was written: its default then, as stored (a list).
    had = {f.name: saved.get(f.name, _plain(f.default)) for f in fields(config)}
    return [
        (n, had[n], wanted[n]) for n in had if n not in RESUME_MAY_CHANGE and had[n] != wanted[n]
    ]


def _check_settings(checkpoint: str, saved: Any, config: TrainConfig) -> None:
    """ValueError naming ``checkpoint`` and each setting in which ``config`` differs from the
    ``saved`` config (:func:`_differences`)."""
    differ = _differences(saved, config)
    if differ is None:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: its metrics record no training config "
            "(resume needs a checkpoint written by segpipe.training.train)"
        )
    if differ:
        was = ", ".join(f"{name}={old!r}" for name, old, _ in differ)
        now = ", ".join(f"{name}={new!r}" for name, _, new in differ)
        raise ValueError(
            f"cannot resume from {checkpoint}: its run trained with {was}, this config asks "
            f"for {now}. A resume continues that run: give it the same settings (only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change), or train a new run without resuming"
        )
