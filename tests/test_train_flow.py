"""The train_model flow on Prefect's temporary local server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segpipe import models

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


def test_train_model_flow_trains_evaluates_and_saves(prefect_harness, tmp_path: Path) -> None:
    from segpipe.flows.train_model import train_model

    torch.set_num_threads(1)
    out = tmp_path / "aerial.pt"
    summary = train_model(
        str(out),
        "unet",
        model_options=MODEL,
        train_options={**TRAIN, "dataset": "aerial", "loss_weights": "unet"},
    )
    assert summary["checkpoint"] == str(out)
    model = models.load(out)  # weights-only loading
    assert model.class_names[1] == "building"
    stored = model.checkpoint_metrics
    assert stored["train_config"]["dataset"] == "aerial"
    assert stored["validation"]["val_seed"] == 10_000
    assert summary["evaluation"]["class_names"] == list(model.class_names)
    # The evaluation task scored what training validated: the same pixels, the same model.
    assert summary["evaluation"]["confusion"] == summary["train"]["confusion"]
