"""The train_model flow on Prefect's temporary local server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe import models
from segpipe.analysis.metrics import confusion_matrix
from segpipe.training import TrainConfig, make_slides

pytestmark = pytest.mark.integration

TRAIN = {
    "steps": 2,
    "batch_size": 2,
    "patch": 16,
    "slide_size": 64,
    "num_slides": 1,
    "val_size": 48,
    "val_tile": 16,
    "num_threads": 1,
    "progress": False,
}
MODEL = {"width": 4, "depth": 2}


def _scored_by_one_forward_pass(model: models.SegmentationModel, config: TrainConfig) -> list:
    """The confusion matrix of ``model`` on the validation image, predicted independently of
    the pipeline's tiling: one forward pass over the whole image, mirrored by the halo."""
    val = make_slides(config)[1][0]
    side = val.labels.shape[0]
    n = model.geometry.input_size(side)
    assert model.geometry.output_size(n) == side
    pad = (n - side) // 2
    image = np.pad(val.image, ((pad, n - side - pad),) * 2 + ((0, 0),), mode="reflect")
    x = torch.from_numpy((image / np.float32(255)).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        predicted = model.eval()(x)[0].argmax(0).numpy()
    classes = len(model.class_names)
    return confusion_matrix(predicted, val.labels.astype(np.int64), classes).tolist()


def test_train_model_flow_trains_evaluates_and_saves(prefect_harness, tmp_path: Path) -> None:
    from segpipe.flows.train_model import train_model

    torch.set_num_threads(1)
    out = tmp_path / "aerial.pt"
    train_options = {**TRAIN, "dataset": "aerial", "loss_weights": "unet"}
    # float32 weights: the file holds the weights training validated.
    summary = train_model(
        str(out), "unet", model_options=MODEL, train_options=train_options, half=False
    )
    assert summary["checkpoint"] == str(out)
    model = models.load(out)  # weights-only loading
    assert model.class_names[1] == "building"
    stored = model.checkpoint_metrics
    assert stored["train_config"]["dataset"] == "aerial"
    assert stored["validation"]["val_seed"] == 10_000
    assert summary["evaluation"]["class_names"] == list(model.class_names)
    # The flow's evaluation, and the file's, are those of the saved weights on the validation
    # image, as a whole-image forward pass and a confusion matrix count them.
    expected = _scored_by_one_forward_pass(model, TrainConfig(**train_options))
    assert summary["evaluation"]["confusion"] == expected
    assert stored["confusion"] == expected


def test_an_output_it_cannot_write_is_refused_before_training(
    prefect_harness, tmp_path, monkeypatch
):
    """A URL or a folder as the checkpoint is refused at the flow's start, not after the
    training it would have thrown away."""
    from segpipe.flows import train_model as flow_module

    trained = []
    monkeypatch.setattr(flow_module, "train", lambda *a, **k: trained.append(1))
    (tmp_path / "folder.pt").mkdir()
    for output in ("memory://models/m.pt", str(tmp_path / "folder.pt")):
        with pytest.raises(ValueError, match=r"m\.pt|folder\.pt"):
            flow_module.train_model(output, model_options=MODEL, train_options=TRAIN)
    # A checkpoint already there is kept unless asked (as `segpipe train` keeps it): the flow
    # replaced it, silently.
    (tmp_path / "kept.pt").write_bytes(b"a user's checkpoint")
    with pytest.raises(FileExistsError, match=r"kept\.pt exists"):
        flow_module.train_model(str(tmp_path / "kept.pt"), model_options=MODEL, train_options=TRAIN)
    assert (tmp_path / "kept.pt").read_bytes() == b"a user's checkpoint"
    assert not trained


def test_the_training_is_a_progress_artifact_of_the_checkpoint(prefect_harness, tmp_path):
    """As every stage of a flow (README): the train stage had a terminal bar and no artifact
    nor log line, so a run's page showed nothing of a long training."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from segpipe.flows.progress import artifact_key
    from segpipe.flows.train_model import train_model

    torch.set_num_threads(1)
    out = str(tmp_path / "tracked.pt")
    train_model(out, model_options=MODEL, train_options={**TRAIN, "steps": 1}, half=False)
    key = artifact_key("train", out)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert [(a.type, a.data) for a in found] == [("progress", 100.0)]
    assert "train: 1/1 step (100%)" in (found[0].description or "")


def test_a_checkpoint_that_appeared_while_it_trained_is_kept(
    prefect_harness, tmp_path, monkeypatch
):
    """Checked at the flow's start only, the output was then replaced by the save whatever
    was there, overwrite=False or not."""
    from segpipe.flows import train_model as flow_module

    out = tmp_path / "m.pt"
    real_train = flow_module.train

    def others_write_meanwhile(*args: object, **kwargs: object) -> dict:
        result = real_train(*args, **kwargs)
        out.write_bytes(b"PK\x03\x04 another run's model")
        return result

    monkeypatch.setattr(flow_module, "train", others_write_meanwhile)
    torch.set_num_threads(1)
    with pytest.raises(FileExistsError, match=r"m\.pt exists"):
        flow_module.train_model(str(out), model_options=MODEL, train_options=TRAIN, half=False)
    assert out.read_bytes() == b"PK\x03\x04 another run's model"
    flow_module.train_model(
        str(out), model_options=MODEL, train_options=TRAIN, half=False, overwrite=True
    )
    assert models.load(out).checkpoint_metrics["train_config"]["steps"] == TRAIN["steps"]


def test_a_fresh_model_is_built_with_the_seed_of_the_train_options(tmp_path, monkeypatch):
    """train_options' seed seeds the initial weights (the flow's doc), as `segpipe train
    --seed` does, not a fixed one that starts every seed from the same weights. The flow's
    body only (.fn, no Prefect run); a stand-in for its build task records the seed."""
    from segpipe.flows import train_model as flow_module

    class Stop(Exception):
        pass

    built = []

    def build(architecture: str, class_names: tuple, seed: int, options: dict) -> None:
        built.append((architecture, seed))
        raise Stop

    monkeypatch.setattr(flow_module, "build_task", build)
    options = {**TRAIN, "seed": 7}
    with pytest.raises(Stop):
        flow_module.train_model.fn(
            str(tmp_path / "m.pt"), model_options=MODEL, train_options=options
        )
    assert built == [("unet", 7)]
