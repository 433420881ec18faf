"""``train_model``: build (or load) a model -> train -> evaluate -> save, as a Prefect flow.

Each task is one library call, so the CLI, a notebook or a test runs the same code without
Prefect. With no ``PREFECT_API_URL`` the flow runs on Prefect's temporary local server. The
model travels between tasks in this process (tasks here are not cached or persisted).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from torch import nn

from segpipe.analysis.evaluation import evaluate_model
from segpipe.training import (
    TrainConfig,
    class_names_for,
    initial_model,
    make_slides,
    save_trained,
    train,
)


@task(name="build-model")
def build_task(
    architecture: str, class_names: tuple[str, ...], seed: int, options: dict[str, Any]
) -> nn.Module:
    get_run_logger().info("model %s %s for classes %s", architecture, options, class_names)
    return initial_model(architecture, class_names=class_names, seed=seed, **options)


@task(name="train")
def train_task(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    result = train(model, config)
    get_run_logger().info(
        "trained %d steps in %.1f s: validation mean Dice %.4f",
        config.steps,
        result["train_seconds"],
        result["mean_dice"],
    )
    return result


@task(name="evaluate")
def evaluate_task(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    scores = evaluate_model(model, make_slides(config)[1], tile=config.val_tile).as_dict()
    get_run_logger().info("validation: %s", scores)
    return scores


@task(name="save")
def save_task(
    model: nn.Module, config: TrainConfig, result: dict[str, Any], output: str, half: bool
) -> str:
    save_trained(model, config, result, output, half=half, extra={"flow": "train_model"})
    return output


@flow(name="train-model", log_prints=True)
def train_model(
    output: str,
    architecture: str = "unet",
    *,
    model_options: dict[str, Any] | None = None,
    train_options: dict[str, Any] | None = None,
    half: bool = True,
) -> dict[str, Any]:
    """Train a model on the data ``train_options`` names and save it at ``output``.

    Parameters
    ----------
    output
        The checkpoint file to write (``segpipe segment --model OUTPUT`` uses it).
    architecture
        A name of ``segpipe.models.available()`` (a fresh model, seeded by the config's seed),
        or a shipped model / checkpoint to fine-tune.
    model_options
        Fields of the architecture's config, e.g. ``{"width": 16, "depth": 3}``.
    train_options
        Fields of :class:`segpipe.training.TrainConfig`, e.g. ``{"dataset": "aerial",
        "steps": 400, "loss_weights": "unet"}``.
    half
        Save float16 weights (half the file).

    Returns
    -------
    dict
        ``{"checkpoint": output, "train": train()'s metrics, "evaluation":
        segpipe.analysis.evaluation.Evaluation.as_dict() on the validation images}``.
    """
    config = TrainConfig(**(train_options or {}))
    model = build_task(
        architecture, class_names_for(config), config.seed, dict(model_options or {})
    )
    result = train_task(model, config)
    scores = evaluate_task(model, config)
    path = save_task(model, config, result, output, half)
    return {"checkpoint": path, "train": result, "evaluation": scores}
