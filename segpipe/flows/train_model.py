"""``train_model``: build (or load) a model -> train (validating it) -> save, as a Prefect flow.

Each task is one library call, so the CLI, a notebook or a test runs the same code without
Prefect. With no ``PREFECT_API_URL`` the flow runs on Prefect's temporary local server. The
model travels between tasks in this process (tasks here are not cached or persisted). The
training's steps are a progress artifact keyed by the checkpoint (``segpipe.flows.progress``).

Validation is scored by training itself (:func:`segpipe.analysis.evaluation.evaluate_model`
after each epoch); the flow reports that evaluation rather than scoring the same weights on
the same images again. Only float16 weights, which differ from the trained ones, are scored
once more, by :func:`segpipe.training.save_trained`, for the file's metrics.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segpipe.analysis.evaluation import Evaluation
from segpipe.flows.limits import guard_when_temporary
from segpipe.flows.progress import ProgressArtifacts
from segpipe.models import SegmentationModel
from segpipe.progress import also_reporting, showing
from segpipe.training import (
    TrainConfig,
    check_output,
    class_names_for,
    initial_model,
    pixel_contract_for,
    save_trained,
    train,
)

# A flow called from Python (no CLI) starts its temporary server guarded too.
guard_when_temporary()


@task(name="build-model", cache_policy=NO_CACHE)
def build_task(
    architecture: str, class_names: tuple[str, ...], seed: int, options: dict[str, Any]
) -> SegmentationModel:
    get_run_logger().info("model %s %s for classes %s", architecture, options, class_names)
    return initial_model(architecture, class_names=class_names, seed=seed, **options)


# No cache key (segpipe.flows.segment_slide says why).
@task(name="train", cache_policy=NO_CACHE)
def train_task(model: SegmentationModel, config: TrainConfig, output: str) -> dict[str, Any]:
    """:func:`segpipe.training.train`, its stage a progress artifact of ``output`` and a log
    line every tenth; ``config.progress`` also shows it on stderr."""
    # showing() outside: inside train(), the artifacts' listener would keep the bar off stderr.
    with showing(config.progress), also_reporting(ProgressArtifacts(output)):
        result = train(model, config)
    get_run_logger().info(
        "trained %d steps in %.1f s; validation:\n%s",
        config.steps,
        result["train_seconds"],
        Evaluation.from_dict(result).report(),
    )
    return result


@task(name="save", cache_policy=NO_CACHE)
def save_task(
    model: SegmentationModel,
    config: TrainConfig,
    result: dict[str, Any],
    output: str,
    half: bool,
    overwrite: bool,
) -> str:
    save_trained(
        model,
        config,
        result,
        output,
        half=half,
        overwrite=overwrite,
        extra={"flow": "train_model"},
    )
    return output


@flow(name="train-model", log_prints=True)
def train_model(
    output: str,
    architecture: str = "unet",
    *,
    model_options: dict[str, Any] | None = None,
    train_options: dict[str, Any] | None = None,
    half: bool = True,
    overwrite: bool = False,
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
    overwrite
        Replace a checkpoint already at ``output`` (else refused before training, as
        ``segpipe train`` refuses without ``--overwrite``, and at the save one that
        appeared while it trained).

    Returns
    -------
    dict
        ``{"checkpoint": output, "train": train()'s metrics, "evaluation":
        segpipe.analysis.evaluation.Evaluation.as_dict() of the trained model on the
        validation images}`` (the last epoch's validation).
    """
    config = TrainConfig(**(train_options or {}))
    # A URL, a folder or an unwritable place is refused before the training, not after it.
    check_output(output, overwrite=overwrite)
    # The data's channels, dtype and scaling size a fresh model (initial_model's contract=).
    options = {"contract": pixel_contract_for(config), **(model_options or {})}
    model = build_task(architecture, class_names_for(config), config.seed, options)
    result = train_task(model, config, output)
    path = save_task(model, config, result, output, half, overwrite)
    return {
        "checkpoint": path,
        "train": result,
        "evaluation": Evaluation.from_dict(result).as_dict(),
    }
