"""What a run puts on its workers: the plugin that loads its model once per worker process,
under a name of its own, and the autocast setting the workers will apply."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any

import distributed
import torch

from segpipe import models
from segpipe.execution.predictor import InferenceConfig, Predictor, resolve_device
from segpipe.execution.tasks import install_predictor, remove_predictor

__all__ = ["ModelPlugin", "has_cuda", "orphaned_plugins", "resolve_amp", "run_key"]


def run_key(model_sha256: str) -> str:
    """A run's name on a cluster: the model's fingerprint and a fresh id.

    Plugin names are global to a cluster, so two runs of one model on a shared cluster would
    replace and then unregister each other's plugin if named by the model alone.
    """
    return f"{model_sha256[:16]}-{uuid.uuid4().hex[:12]}"


# How long a run waits for a first worker to say whether it has a GPU: a shared cluster's
# nannies restarting theirs, an adaptive one starting it.
WORKERS_WAIT_S = 30.0
PLUGIN_PREFIX = "segpipe-model-"
OWNER_MARK = "@"


def orphaned_plugins(dask_scheduler: Any) -> list[str]:
    """The names of segpipe plugins whose registering client has left the scheduler: runs
    whose driver was killed (run on the scheduler by ``client.run_on_scheduler``)."""
    return [
        name
        for name in dask_scheduler.worker_plugins
        if name.startswith(PLUGIN_PREFIX)
        and OWNER_MARK in name
        and name.rsplit(OWNER_MARK, 1)[1] not in dask_scheduler.clients
    ]


class ModelPlugin(distributed.WorkerPlugin):
    """Loads a run's model once per worker process, not once per tile.

    The device is resolved here, on the worker: ``"auto"`` is this worker's GPU when it has
    one, whatever the driver has.
    """

    def __init__(
        self,
        key: str,
        source: str | torch.nn.Module,
        config: InferenceConfig,
        owner: str | None = None,
    ) -> None:
        self.key = key
        self.source = source
        self.config = config
        # The registering client's id (``Client.id``) in the name: a driver killed before it
        # unregistered leaves a plugin the next run drops (:func:`orphaned_plugins`).
        self.name = PLUGIN_PREFIX + key + (f"{OWNER_MARK}{owner}" if owner else "")

    def setup(self, worker: Any = None) -> None:
        try:
            device = resolve_device(self.config.device)
        except RuntimeError as err:
            where = f"worker {worker.address}" if worker is not None else f"pid {os.getpid()}"
            raise RuntimeError(
                f"{where}: {err}; run on workers that have it, or use device='auto' or 'cpu'"
            ) from None
        config = dataclasses.replace(self.config, device=str(device))

        def make() -> Predictor:
            source = self.source
            net = source if isinstance(source, torch.nn.Module) else models.load(source)
            return Predictor(net, config)

        install_predictor(self.key, make)

    def teardown(self, worker: Any = None) -> None:
        remove_predictor(self.key)


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU in this process (run on workers by ``client.run``)."""
    return bool(torch.cuda.is_available())


def resolve_amp(amp: bool | None, device: str, client: Any) -> bool:
    """The concrete autocast setting of a run, as its workers will apply it.

    ``amp=None`` means on CUDA only: on when ``device`` is not ``"cpu"`` and every worker of
    ``client`` sees a GPU (None: this process, which runs the tasks or the local cluster).
    A result's identity records this value, so it must be the one the workers use.
    """
    if amp is not None:
        return amp
    if device == "cpu":
        return False
    deadline = time.monotonic() + WORKERS_WAIT_S
    answers = client.run(has_cuda, on_error="return") if client is not None else {0: has_cuda()}
    # None up yet, or those listed gone (a cluster restarting its workers, which the scheduler
    # lists until it notices): the run would fail at once, so it asks again for a while.
    while client is not None and all(isinstance(a, OSError) for a in answers.values()):
        if deadline - time.monotonic() <= 0:
            break
        if answers:  # listed but not answering: not a busy loop
            time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        try:  # a worker that joins is asked at once
            client.wait_for_workers(1, timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        answers = client.run(has_cuda, on_error="return")
    for worker, answer in answers.items():
        # a worker that died meanwhile is left out (its tasks go to the others); any other
        # error of a worker's (segpipe not installed there) is its own to report
        if isinstance(answer, BaseException) and not isinstance(answer, OSError):
            raise RuntimeError(f"worker {worker} could not say whether it has a GPU: {answer!r}")
    cuda = {a for a in answers.values() if not isinstance(a, BaseException)}
    if not cuda:
        said = f"none of its {len(answers)} workers answered" if answers else "it had no worker"
        raise ValueError(
            f"device {device!r} with amp=None: the cluster cannot say whether its workers have "
            f"a GPU ({said} for {WORKERS_WAIT_S:g} s); set amp=True or amp=False, or start "
            "its workers first"
        )
    if len(cuda) > 1:
        raise ValueError(
            f"device {device!r} with amp=None: some workers have a CUDA GPU and some do not, "
            "so the run would mix autocast and float32; set amp=True or amp=False"
        )
    return cuda == {True}
