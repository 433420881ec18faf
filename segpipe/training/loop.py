"""The training loop: initial model, epochs with validation and checkpoints, save_trained.

Validation is :func:`segpipe.analysis.evaluation.evaluate_model`, the evaluator every other
caller uses, predicting through the pipeline's overlap-tile stitcher; a result holds its
:class:`~segpipe.analysis.evaluation.Evaluation` as plain data (``Evaluation.as_dict``).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from segpipe.analysis.evaluation import Evaluation, evaluate_model
from segpipe.atomic import scratch_file
from segpipe.execution.predictor import is_out_of_memory
from segpipe.geometry.tiling import Geometry
from segpipe.models.base import geometry_of, is_registered
from segpipe.progress import Stage, showing, stage
from segpipe.training.config import (
    TrainConfig,
    loss_weight_maps,
    make_slides,
    training_contract,
)
from segpipe.training.datasets import separate_touching
from segpipe.training.losses import softmax_cross_entropy
from segpipe.training.output import check_output, place_file
from segpipe.training.sampling import sample_pairs
from segpipe.training.state import (
    check_checkpoint_dir,
    data_fingerprint,
    load_state,
    save_state,
)

if TYPE_CHECKING:
    from segpipe.models import SegmentationModel
    from segpipe.models.contract import PixelContract

__all__ = ["check_output", "format_report", "initial_model", "save_trained", "train"]


def initial_model(
    name_or_checkpoint: str,
    *,
    class_names: Sequence[str],
    seed: int = 0,
    contract: PixelContract | None = None,
    **options: Any,
) -> SegmentationModel:
    """The model training starts from: a fresh ``segpipe.models.build(name, ...)`` with torch
    seeded by ``seed`` (reproducible initial weights), or a checkpoint/shipped model to
    fine-tune (``options`` must then be empty).

    ``contract`` (:func:`~segpipe.training.config.pixel_contract_for` of the data) sizes a
    fresh model's input (``in_channels``) and, when it has measured statistics, its
    normalisation; a model to fine-tune keeps its own contract."""
    from segpipe import models

    if name_or_checkpoint in models.available():
        torch.manual_seed(seed)
        if contract is not None:
            options.setdefault("in_channels", contract.channels)
            if contract.mean is not None and contract.std is not None:
                options.setdefault("input_mean", contract.mean)
                options.setdefault("input_std", contract.std)
        model = models.build(name_or_checkpoint, class_names=class_names, **options)
        model.pixel_contract = contract
        return model
    model = models.load(name_or_checkpoint)  # first: a name of nothing is said to be that
    if options:
        raise ValueError(
            f"{name_or_checkpoint!r} is a trained model; its architecture is fixed, so the "
            f"options {sorted(options)} cannot apply"
        )
    if not is_registered(model):  # refused now, not by the save after training
        raise ValueError(
            f"{name_or_checkpoint} is a {type(model).__name__} (TorchScript or torch.export): "
            "segpipe trains and saves its own architectures; fine-tune it where it was made"
        )
    if tuple(model.class_names) != tuple(class_names):
        raise ValueError(
            f"{name_or_checkpoint} predicts {model.class_names}, the data has {tuple(class_names)}"
        )
    return model


def format_report(result: dict[str, Any]) -> str:
    """What :func:`train` returned as text: the final validation's table
    (:meth:`Evaluation.report`), one line per epoch, the training time."""
    lines = [Evaluation.from_dict(result).report()]
    for e in result.get("epochs", []):
        lines.append(
            f"epoch {e['epoch']:>3}  step {e['step']:>6}  loss {e['loss']:.4f}  "
            f"mean Dice {e['mean_dice']:.4f}  mean IoU {e['mean_iou']:.4f}"
        )
    lines.append(f"trained in {result['train_seconds']:.1f} s")
    return "\n".join(lines)


def train(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Train ``model`` in place; return its validation metrics.

    The loss is pixel-wise softmax cross-entropy, ``-log P_truth(i, j)``, **averaged** over
    all pixels of the batch (weighted mean ``sum(w L) / sum(w)`` with loss weights; see
    :func:`segpipe.training.losses.softmax_cross_entropy`; the notes' image loss is the sum, which
    differs only by a constant factor the learning rate absorbs).

    Seeds torch and numpy from ``config.seed`` for sampling, augmentation and dropout; the
    initial weights were drawn when the model was built, so seed torch before building it
    (``torch.manual_seed(config.seed)``, or :func:`initial_model`) for a run that reproduces
    bit for bit. A run resumed from one of its checkpoints (``config.resume_from``, the
    other settings those of the run that wrote it) ends with the same weights as an
    uninterrupted one; resumed from the last, it trains nothing and returns the run's result.

    Returns
    -------
    dict
        The validation after the last epoch (:func:`segpipe.analysis.evaluation.evaluate_model`
        on the validation images, as ``Evaluation.as_dict()``), plus ``"epochs"`` (per epoch:
        step, mean loss, Dice, IoU), ``"loss_history"`` (mean loss per ``log_every`` steps),
        ``"final_loss"``, ``"train_seconds"``, ``"config"``, ``"checkpoint"`` (the last one
        written, or None), ``"threads"`` (torch's thread count while it trained). Plain data,
        ready for ``segpipe.models.save(..., metrics=...)``.
    """
    threads = config.num_threads or len(os.sched_getaffinity(0))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with showing(config.progress):
            return _train(model, config)
    finally:
        torch.set_num_threads(previous_threads)


def _train(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    geometry = geometry_of(model)
    # Validation tiles the model's way (evaluate_model): refused now, not after an epoch.
    if config.val_tile % geometry.multiple:
        raise ValueError(
            f"TrainConfig.val_tile {config.val_tile} px is not a multiple of the model's size "
            f"multiple {geometry.multiple}; use {_round_up(config.val_tile, geometry.multiple)}"
        )
    train_slides, val_slides = make_slides(config)
    data_sha256 = data_fingerprint(train_slides, val_slides)
    if config.separate_touching:
        train_slides = [separate_touching(s) for s in train_slides]
    names = tuple(train_slides[0].class_names)
    classes = getattr(model, "num_classes", len(names))
    if classes != len(names):
        raise ValueError(
            f"the model predicts {classes} classes, the {config.dataset} data has "
            f"{len(names)}: {names}; build it with class_names={names}"
        )
    contract = training_contract(model, config, train_slides)
    weight_maps = loss_weight_maps(train_slides, config)
    augmentation = config.augmentation
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    # Cosine decay to zero: large steps early, fine boundaries at the end.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)

    history: list[float] = []
    window_losses: list[float] = []
    epochs: list[dict[str, Any]] = []
    first_step, seconds_before = 0, 0.0
    scores: Evaluation | None = None
    # What the weights reproduce on: kernels split their sums by thread and by vector width
    # (AVX2 and AVX-512 round differently). A resume may run on another count (or machine).
    here = {"threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability()}
    machines: list[dict[str, Any] | None] = [here]
    if config.resume_from:
        state = load_state(
            config.resume_from, model, optimiser, schedule, rng, config, data_sha256=data_sha256
        )
        first_step, seconds_before = state["step"], state["train_seconds"]
        history, window_losses, epochs = (
            state["loss_history"],
            state["window_losses"],
            state["epochs"],
        )
        # States before machines were kept: trained on what no one knows
        machines = [*state.get("machines", [None]), here]
        # The checkpoint's validation: the result, should no step be left to train.
        if state["evaluation"] is not None:
            scores = Evaluation.from_dict(state["evaluation"])
    check_checkpoint_dir(config, len(epochs))

    model.train()
    start = time.perf_counter()
    checkpoint: Path | None = None
    epoch_losses: list[float] = []
    for step, steps in _steps(first_step, config.steps):
        with _fitting(config, geometry):
            batch = sample_pairs(
                train_slides,
                geometry,
                config.patch,
                config.batch_size,
                rng,
                augmentation=augmentation,
                weight_maps=weight_maps,
                scale=contract.scale,
            )
            logits = model(torch.from_numpy(batch.images))
            weights = None if batch.weights is None else torch.from_numpy(batch.weights)
            loss = softmax_cross_entropy(logits, torch.from_numpy(batch.labels), weights)
        window_losses.append(loss.item())
        if not np.isfinite(window_losses[-1]):  # every step after would be NaN
            raise ValueError(
                f"training diverged at step {step + 1}: the loss is {window_losses[-1]}; "
                f"lower the learning rate (lr={config.lr:g}, --lr)"
            )
        optimiser.zero_grad(set_to_none=True)
        with _fitting(config, geometry):
            loss.backward()
        optimiser.step()
        schedule.step()
        epoch_losses.append(window_losses[-1])
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append(float(np.mean(window_losses)))
            window_losses.clear()
            steps.note = f"loss {history[-1]:.4f}"
        if (step + 1) % config.steps_per_epoch == 0 or step + 1 == config.steps:
            scores = evaluate_model(model, val_slides, tile=config.val_tile)
            epochs.append(
                {
                    "epoch": len(epochs) + 1,
                    "step": step + 1,
                    "loss": float(np.mean(epoch_losses)),
                    "mean_dice": scores.mean_dice,
                    "mean_iou": scores.mean_iou,
                    "dice": scores.dice,
                    "iou": scores.iou,
                }
            )
            epoch_losses.clear()
            seconds = seconds_before + time.perf_counter() - start
            if config.checkpoint_dir:
                checkpoint = save_state(
                    model,
                    optimiser,
                    schedule,
                    rng,
                    config,
                    step + 1,
                    seconds,
                    history,
                    window_losses,
                    epochs,
                    scores.as_dict(),
                    data_sha256=data_sha256,
                    machines=machines,
                )
    train_seconds = seconds_before + time.perf_counter() - start
    if scores is None:
        # Resumed from a last checkpoint whose state predates the kept validation.
        scores = evaluate_model(model, val_slides, tile=config.val_tile)

    model.eval()
    result: dict[str, Any] = {
        **scores.as_dict(),
        "epochs": epochs,
        "loss_history": history,
        "final_loss": history[-1],
        "train_seconds": round(train_seconds, 1),
        "config": asdict(config),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        # One count and instruction set for the whole training, else None (mixed, unknown)
        "threads": _only({m["threads"] if m else None for m in machines}),
        "cpu_capability": _only({m["cpu"] if m else None for m in machines}),
    }
    if config.progress:
        print(format_report(result))
    return result


@contextlib.contextmanager
def _fitting(config: TrainConfig, geometry: Geometry) -> Iterator[None]:
    """A step that runs out of memory refused as the options' fault, naming them: numpy's
    message names an array shape, torch's CPU allocator a byte count (a 60-line traceback)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        side = geometry.input_size(config.patch)
        # A resume keeps its run's options (load_state refuses others): more memory, or anew.
        fix = (
            "give it more memory, or train anew with a lower --patch or --batch-size"
            if config.resume_from
            else "lower --patch or --batch-size, or the model's --width"
        )
        raise ValueError(
            f"a training batch of {config.batch_size} (--batch-size) patches of {config.patch} "
            f"px (--patch; windows of {side} px a side with the model's context) does not fit "
            f"in memory ({type(exc).__name__}: {str(exc)[:200]}); {fix}"
        ) from exc


def _only(values: set[Any]) -> Any:
    """The one value of ``values``, else None."""
    return next(iter(values)) if len(values) == 1 else None


def _round_up(n: int, multiple: int) -> int:
    """The multiple of ``multiple`` at or above ``n``: ``_round_up(20, 8) == 24``."""
    return n + (-n) % multiple


def _steps(first: int, last: int) -> Iterator[tuple[int, Stage]]:
    """Steps ``first`` to ``last - 1`` as the "train" stage, advanced as each one ends."""
    with stage("train", total=last - first, unit="step") as steps:
        for step in range(first, last):
            yield step, steps
            steps.advance()


def save_trained(
    model: SegmentationModel,
    config: TrainConfig,
    result: dict[str, Any],
    output: str | os.PathLike[str],
    *,
    half: bool = True,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save a model :func:`train` trained, with the scores of **what was saved**.

    ``result`` is what :func:`train` returned: its last validation scored these very weights.
    With ``half=True`` the float16 weights differ from them, so they are loaded back and
    evaluated on the validation images, and the file's metrics describe exactly what ships;
    with ``half=False`` the training's own validation is kept (nothing is scored twice). The
    metrics hold those scores (``Evaluation.as_dict``), the validation data, the loss history,
    the training config, what the weights reproduce on (torch and numpy versions, the thread
    count training used, the CPU's instruction set) and ``extra`` (e.g. the command that
    reproduces the file). Returns the metrics saved.

    ``output`` is :func:`check_output`'s. A file there is replaced only with ``overwrite``,
    and only by the final file: until it is written, an old one (a fine-tune's original)
    stays as it was. Without ``overwrite`` a file there when the model is placed (one that
    appeared while it trained) is left as it is: FileExistsError names it, and where the
    trained model was kept instead.
    """
    import platform

    from segpipe import models

    # The file's existence is judged when it is placed (place_file): it may appear until then.
    path = check_output(output, overwrite=True)
    if half and (key := _beyond_half(model)) is not None:
        # Hours of training are not thrown away at the last step for a storage format.
        warnings.warn(
            f"{path}: weight {key!r} of the trained model lies beyond float16's 65504; saving "
            "float32 weights (as full_precision, --full-precision, does)",
            stacklevel=2,
        )
        half = False
    # The float16 weights scored are those read back from a file, as a user will read them.
    with scratch_file(path) as unscored:
        saved = models.load(models.save(model, unscored, half=half))
    scores = (
        evaluate_model(saved, make_slides(config)[1], tile=config.val_tile)
        if half
        else Evaluation.from_dict(result)
    )
    data: dict[str, Any] = {"dataset": config.dataset, "train_seeds": config.train_seeds}
    if config.dataset == "folder":
        data = {"dataset": "folder", "train": config.train_folder, "val": config.val_folder}
    else:
        data.update(val_seed=config.val_seed, val_size_px=config.val_size)
    saved_metrics = {
        **scores.as_dict(),
        "validation": data,
        "loss_history": result["loss_history"],
        "final_loss": result["final_loss"],
        "epochs": result.get("epochs", []),
        "train_seconds": result["train_seconds"],
        "train_config": asdict(config),
        "torch": torch.__version__,
        "numpy": np.__version__,
        # Kernels split their sums by thread and by vector width (AVX2 and AVX-512 round
        # differently): the same weights come out only on the same of both.
        # None where training ran on several (a resume) or they are not known
        "threads": result.get("threads"),
        "cpu_capability": result.get("cpu_capability"),
        "python": platform.python_version(),
        **(extra or {}),
    }
    with scratch_file(path) as final:
        models.save(saved, final, metrics=saved_metrics, half=half)
        place_file(final, path, overwrite=overwrite)
    return saved_metrics


def _beyond_half(model: nn.Module) -> str | None:
    """The name of a finite floating-point weight of ``model`` that float16 cannot hold."""
    for key, t in model.state_dict().items():
        finite = t.is_floating_point() and bool(torch.isfinite(t).all())
        if finite and not bool(torch.isfinite(t.detach().to(torch.float16)).all()):
            return key
    return None
