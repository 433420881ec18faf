"""The training loop's pieces: sampler geometry, augmentation, learning, validation.

Validation's inference (the overlap-tile stitcher) is tested in test_execution.py, its scores
(evaluate_model) in test_evaluation.py.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from segpipe.analysis.evaluation import evaluate_model
from segpipe.geometry.tiling import Geometry
from segpipe.synthetic import SyntheticSlide, tissue_slide
from segpipe.training import (
    Augmentation,
    TrainConfig,
    augment,
    make_slides,
    patch_pair,
    sample_batch,
    train,
)

if TYPE_CHECKING:
    from segpipe.models import SegmentationModel

GEOMETRIES = [
    Geometry(halo=44, multiple=8, input_offset=4, shrinks=True),  # valid U-Net, depth 3
    Geometry(halo=20, multiple=4, input_offset=0, shrinks=True),  # valid U-Net, depth 2
    Geometry(halo=51, multiple=8, input_offset=0, shrinks=False),  # same padding, depth 3
]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads, and on a busy machine torch's worker threads wait
    # on each other (a 10x slowdown seen here); restore the setting for other tests.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def slide() -> SyntheticSlide:
    return tissue_slide((160, 192), seed=11)


def tiny_unet(depth: int = 2, *, width: int = 4, dropout: float = 0.0) -> SegmentationModel:
    from segpipe import models  # imported only by the tests that need a model

    return models.build(
        "unet",
        class_names=("background", "tissue", "nucleus"),
        in_channels=3,
        width=width,
        depth=depth,
        padding="valid",
        dropout=dropout,
    )


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("patch", [16, 37])
def test_patch_pair_follows_the_geometry(
    slide: SyntheticSlide, geometry: Geometry, patch: int
) -> None:
    n = geometry.input_size(patch)
    o = geometry.output_size(n)
    margin = (n - o) // 2
    y, x = 60, 70
    image, labels = patch_pair(slide, y, x, geometry, patch)
    assert image.shape == (3, n, n)
    assert image.dtype == np.float32
    assert labels.shape == (o, o)
    assert labels.dtype == np.int64
    assert o >= patch
    # Both cut from the slide at the same place; the labels sit in the window's centre.
    padded_image = np.pad(slide.image, ((n, n), (n, n), (0, 0)), mode="reflect")
    padded_labels = np.pad(slide.labels, n, mode="reflect")
    y0, x0 = y - margin + n, x - margin + n
    np.testing.assert_array_equal(
        image, padded_image[y0 : y0 + n, x0 : x0 + n].transpose(2, 0, 1) / np.float32(255)
    )
    np.testing.assert_array_equal(labels, padded_labels[y + n : y + n + o, x + n : x + n + o])


@pytest.mark.parametrize(("y", "x"), [(0, 0), (150, 185), (0, 100)])
def test_patch_pair_mirrors_at_slide_borders(slide: SyntheticSlide, y: int, x: int) -> None:
    geometry = GEOMETRIES[0]
    n = geometry.input_size(24)
    o = geometry.output_size(n)
    m = geometry.halo
    image, labels = patch_pair(slide, y, x, geometry, 24)
    # numpy's "reflect" (edge not repeated) is the U-Net paper's mirroring.
    padded = np.pad(slide.image, ((m, n), (m, n), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(
        image, padded[y : y + n, x : x + n].transpose(2, 0, 1) / np.float32(255)
    )
    padded_labels = np.pad(slide.labels, ((0, o), (0, o)), mode="reflect")
    np.testing.assert_array_equal(labels, padded_labels[y : y + o, x : x + o])


def _label_from_image(image: np.ndarray, margin: int, side: int) -> np.ndarray:
    """A labelling computed from the image alone: its window centre thresholded per pixel."""
    centre = image[:, margin : margin + side, margin : margin + side]
    return (centre[0] > 0.8).astype(np.int64) + (centre[2] > centre[1] + 0.3)


def test_augmentation_keeps_image_and_labels_aligned() -> None:
    geometry = GEOMETRIES[0]
    n = geometry.input_size(20)
    o = geometry.output_size(n)
    margin = (n - o) // 2
    base = tissue_slide(128, seed=4)
    # A slide whose labels are a per-pixel function of its image: any misalignment after a
    # flip or rotation breaks the relation.
    derived = _label_from_image(base.image.transpose(2, 0, 1) / np.float32(255), 0, 128)
    slide = SyntheticSlide(base.image, derived.astype(np.uint8), base.instances)
    rng = np.random.default_rng(0)
    images, labels = sample_batch([slide], geometry, 20, 64, rng)
    for image, label in zip(images, labels, strict=True):
        np.testing.assert_array_equal(label, _label_from_image(image, margin, o))
    # And augmentation did something: the 8 symmetries of an asymmetric patch differ.
    image = np.arange(3 * 6 * 6, dtype=np.float32).reshape(3, 6, 6)
    label = np.arange(16).reshape(4, 4)
    seen = {augment(image, label, rng)[0].tobytes() for _ in range(200)}
    assert len(seen) == 8


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_sample_batch_shapes(slide: SyntheticSlide, geometry: Geometry) -> None:
    rng = np.random.default_rng(1)
    images, labels = sample_batch([slide, slide], geometry, 24, 5, rng)
    n = geometry.input_size(24)
    assert images.shape == (5, 3, n, n)
    assert labels.shape == (5, *(geometry.output_size(n),) * 2)
    assert images.dtype == np.float32
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_sample_batch_is_reproducible(slide: SyntheticSlide) -> None:
    a = sample_batch([slide], GEOMETRIES[1], 16, 4, np.random.default_rng(5))
    b = sample_batch([slide], GEOMETRIES[1], 16, 4, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_a_tiny_unet_overfits_one_batch(slide: SyntheticSlide) -> None:
    torch.manual_seed(0)
    model = tiny_unet().train()
    images, labels = sample_batch(
        [slide], model.geometry, 24, 4, np.random.default_rng(2), is_augmented=False
    )
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses


def _fixed_batch_loss(model: SegmentationModel, config: TrainConfig) -> float:
    """The model's cross-entropy, in eval mode, on one fixed unaugmented batch of the
    config's training slides: the same pixels before and after training, so a lower value is
    learning, not a luckier draw of batches (which the loss history alone could be)."""
    images, labels = sample_batch(
        make_slides(config)[0], model.geometry, 24, 8, np.random.default_rng(7), is_augmented=False
    )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(images)), torch.from_numpy(labels)
        )
    model.train(was_training)
    return loss.item()


def _assert_trained(before: list[torch.Tensor], model: SegmentationModel) -> None:
    """Every weight moved from ``before``: equal runs are then equal learning, not two runs
    that never updated their weights."""
    unchanged = [
        name
        for (name, p), b in zip(model.named_parameters(), before, strict=True)
        if torch.equal(p.detach(), b)
    ]
    assert not unchanged, f"training left these weights as they were: {unchanged}"


def test_train_runs_reproducibly_and_returns_plain_metrics() -> None:
    """Two runs from the same seed end with the same weights and losses; and the run learns:
    every weight moves and the loss on one fixed batch falls."""
    config = TrainConfig(
        steps=4,
        batch_size=2,
        patch=16,
        slide_size=96,
        num_slides=2,
        val_size=48,
        val_tile=16,
        log_every=2,
        num_threads=1,
        progress=False,
    )
    results, weights = [], []
    for _ in range(2):
        torch.manual_seed(config.seed)  # the initial weights are the caller's to seed
        model = tiny_unet()
        initial = [p.detach().clone() for p in model.parameters()]
        loss_before = _fixed_batch_loss(model, config)
        results.append(train(model, config))
        weights.append([p.detach().clone() for p in model.parameters()])
        assert not model.training
        _assert_trained(initial, model)
        assert _fixed_batch_loss(model, config) < 0.95 * loss_before
    result = results[0]
    assert set(result["dice"]) == {"background", "tissue", "nucleus"}
    assert len(result["loss_history"]) == 2
    json.dumps(result)  # plain data, fit for a checkpoint's metrics
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert results[0]["loss_history"] == results[1]["loss_history"]
    # The validation is the one evaluator's, of the trained weights.
    val = make_slides(config)[1]
    assert result["confusion"] == evaluate_model(model, val, tile=16).as_dict()["confusion"]
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"seed": 5, "num_slides": 3, "val_seed": 6}, "held out"),
        # Both ends of the training seeds 5..7: the first is a training slide's too.
        ({"seed": 5, "num_slides": 3, "val_seed": 5}, "held out"),
        ({"seed": 5, "num_slides": 3, "val_seed": 7}, "held out"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("val_seed", [4, 8])
def test_a_validation_seed_next_to_the_training_seeds_is_accepted(val_seed: int) -> None:
    assert TrainConfig(seed=5, num_slides=3, val_seed=val_seed).train_seeds == [5, 6, 7]


# --- datasets, loss weights, epochs, checkpoints and resume -------------------------------

TINY = dict(
    steps=4,
    batch_size=2,
    patch=16,
    slide_size=96,
    num_slides=2,
    val_size=48,
    val_tile=16,
    log_every=2,
    num_threads=1,
    progress=False,
)


def test_resume_from_a_checkpoint_ends_like_an_uninterrupted_run(tmp_path) -> None:
    from segpipe import models
    from segpipe.training import state_path

    # Dropout draws from torch's generator, and log_every=3 leaves a loss window open at the
    # epoch-1 checkpoint (step 2): the resume must restore both to end bit for bit the same.
    settings = {**TINY, "log_every": 3, "epochs": 2, "elastic_std_px": 2.0, "jitter": 0.1}
    config = TrainConfig(**settings, checkpoint_dir=str(tmp_path))
    torch.manual_seed(0)
    straight = tiny_unet(dropout=0.3)
    initial = [p.detach().clone() for p in straight.parameters()]
    result = train(straight, config)
    _assert_trained(initial, straight)
    assert [e["step"] for e in result["epochs"]] == [2, 4]
    assert len(result["loss_history"]) == 2  # steps 1-3 and step 4
    assert result["checkpoint"] == str(tmp_path / "epoch-002.pt")
    first = tmp_path / "epoch-001.pt"
    # Both files load with weights_only (models.load uses it).
    assert models.load(first).checkpoint_metrics["step"] == 2
    torch.load(state_path(first), weights_only=True)

    torch.manual_seed(123)  # other initial weights: the checkpoint's must replace them
    resumed = tiny_unet(dropout=0.3)
    again = train(resumed, TrainConfig(**settings, resume_from=str(first)))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The resumed run trained on from the checkpoint's weights, not merely loaded them.
    _assert_trained([p.detach() for p in models.load(first).parameters()], resumed)
    assert again["loss_history"] == result["loss_history"]
    assert [e["epoch"] for e in again["epochs"]] == [1, 2]
    # Into its own folder, epoch-002.pt still there: checking that file is this run's built
    # its model, which drew from the generator just restored (other dropout masks, 4e-3 off).
    torch.manual_seed(5)
    in_place = tiny_unet(dropout=0.3)
    train(in_place, TrainConfig(**settings, checkpoint_dir=str(tmp_path), resume_from=str(first)))
    for a, b in zip(straight.parameters(), in_place.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_without_its_state_file_is_refused(tmp_path) -> None:
    from segpipe import models

    path = models.save(tiny_unet(), tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="optimiser state"):
        train(tiny_unet(), TrainConfig(**TINY, resume_from=str(path)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, dict]:
    """A two-epoch run that wrote ``epoch-001.pt`` and ``epoch-002.pt``, and its result."""
    config = TrainConfig(**TINY, epochs=2, checkpoint_dir=str(tmp_path_factory.mktemp("run")))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = train(tiny_unet(), config)
    torch.set_num_threads(previous)
    return config, result


def _resume(config: TrainConfig, epoch: int, **changes: object) -> TrainConfig:
    checkpoint = f"{config.checkpoint_dir}/epoch-{epoch:03d}.pt"
    return replace(config, checkpoint_dir=None, resume_from=checkpoint, **changes)


def test_resume_from_the_final_checkpoint_returns_the_finished_result(finished_run) -> None:
    from segpipe.training import format_report

    config, result = finished_run
    again = train(tiny_unet(), _resume(config, 2))
    # Nothing left to train: the run's last validation, epochs and losses, as it ended.
    for key in ("confusion", "dice", "iou", "class_names", "epochs", "loss_history"):
        assert again[key] == result[key], key
    assert again["final_loss"] == result["final_loss"]
    assert format_report(again).splitlines()[:5] == format_report(result).splitlines()[:5]


def test_resume_from_a_final_state_without_its_validation_validates(finished_run, tmp_path) -> None:
    import shutil

    from segpipe.training import state_path

    config, result = finished_run
    copy = tmp_path / "epoch-002.pt"
    shutil.copy(f"{config.checkpoint_dir}/epoch-002.pt", copy)
    # A state written before the validation and the checkpoint's fingerprint were kept in it.
    state = torch.load(state_path(f"{config.checkpoint_dir}/epoch-002.pt"), weights_only=True)
    del state["evaluation"], state["fingerprint"]
    torch.save(state, state_path(copy))
    again = train(tiny_unet(), replace(config, checkpoint_dir=None, resume_from=str(copy)))
    assert again["confusion"] == result["confusion"]


@pytest.mark.parametrize(
    ("lie", "shown"),
    [
        pytest.param(None, r"state at step 4, epoch 2; .* step 2, epoch 1", id="epoch 2's state"),
        pytest.param({"step": 0}, r"state at step 0, epoch 1; .* step 2, epoch 1", id="step 0"),
        pytest.param({"step": -2}, "step=-2", id="step -2"),
        pytest.param({"step": 400}, "step=400", id="step past the end"),
        pytest.param({"step": "2"}, "step='2'", id="step a string"),
        pytest.param({"step": 2.5}, r"step=2\.5", id="step a float"),
        pytest.param({"loss_history": "abc"}, "loss_history='abc'", id="history a string"),
        pytest.param({"window_losses": None}, "window_losses=None", id="window None"),
        pytest.param({"train_seconds": math.nan}, "train_seconds=nan", id="seconds NaN"),
        pytest.param({"epochs": json.dumps([1, 2])}, r"epochs=\[1, 2\]", id="epochs of ints"),
        pytest.param({"evaluation": json.dumps([1])}, "evaluation", id="evaluation a list"),
        pytest.param({"fingerprint": "0" * 64}, "other weights than", id="another fingerprint"),
    ],
)
def test_resume_from_a_state_not_its_checkpoints_is_refused(
    finished_run, tmp_path: Path, lie: dict | None, shown: str
) -> None:
    """Epoch 2's state beside epoch 1's weights trained nothing and reported epoch 2's scores
    for them; a step of 0 trained an epoch twice, and a string or a float failed bare."""
    import re
    import shutil

    from segpipe.models import CheckpointError
    from segpipe.training import state_path

    config, _ = finished_run
    run, copy = Path(str(config.checkpoint_dir)), tmp_path / "epoch-001.pt"
    shutil.copy(run / "epoch-001.pt", copy)
    if lie is None:
        shutil.copy(state_path(run / "epoch-002.pt"), state_path(copy))
    else:
        state = torch.load(state_path(run / "epoch-001.pt"), weights_only=True)
        torch.save({**state, **lie}, state_path(copy))
    with pytest.raises(CheckpointError, match=re.escape(str(state_path(copy)))) as err:
        train(tiny_unet(), replace(config, checkpoint_dir=None, resume_from=str(copy)))
    assert re.search(shown, str(err.value)), str(err.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"steps": 8},
        {"lr": 0.5},
        {"loss_weights": "balanced"},
        {"steps": 8, "lr": 0.5},
        # Other batches: the resumed run's weights would be neither run's.
        {"batch_size": 4},
        {"patch": 24},
        {"seed": 3},
        {"jitter": 0.1},
    ],
)
def test_resume_with_other_training_settings_is_refused(finished_run, changes: dict) -> None:
    """Only where and how a run computes may change on a resume: any other setting would
    silently continue the run's weights as another run's."""
    config, _ = finished_run
    with pytest.raises(ValueError, match=r"epoch-001\.pt") as err:
        train(tiny_unet(), _resume(config, 1, **changes))
    for name, value in changes.items():
        assert f"{name}={value!r}" in str(err.value)
        assert f"{name}={getattr(config, name)!r}" in str(err.value)


def test_resume_from_a_checkpoint_older_than_a_settings_default_takes_that_default(
    finished_run, tmp_path: Path
) -> None:
    """A checkpoint written before ``percentiles`` existed ran with its default, (0.5, 99.5),
    which a checkpoint stores as a list: it was refused as a run "trained with
    percentiles=(0.5, 99.5)" that this config's [0.5, 99.5] differs from."""
    import shutil

    from segpipe import models
    from segpipe.training.state import state_path

    config, result = finished_run
    final = f"{config.checkpoint_dir}/epoch-002.pt"
    model = models.load(final)
    metrics = dict(model.checkpoint_metrics)
    metrics["config"] = {k: v for k, v in metrics["config"].items() if k != "percentiles"}
    older = tmp_path / "epoch-002.pt"
    models.save(model, older, metrics=metrics)
    shutil.copy(state_path(final), state_path(older))
    again = train(tiny_unet(), replace(config, checkpoint_dir=None, resume_from=str(older)))
    assert again["loss_history"] == result["loss_history"]


@pytest.mark.parametrize(
    "change",
    [
        "a training image's pixels",
        "an object left out of a training image's instances",
        "a training image moved to the validation images",
    ],
)
def test_resume_on_other_images_than_its_runs_is_refused(
    finished_run, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The run's images are its training images, with their instances (they make the
    U-Net weights and the separated labels), and its validation images, each set as such:
    a resume on any other data went on silently, its weights neither run's."""
    from segpipe.models import CheckpointError
    from segpipe.training import loop

    config, _ = finished_run
    (first, second), (val,) = make_slides(config)
    assert first.instances.any(), "an object to leave out"
    if change == "a training image's pixels":
        data = [replace(first, image=first.image[::-1].copy()), second], [val]
    elif change.startswith("an object"):
        data = [replace(first, instances=np.zeros_like(first.instances)), second], [val]
    else:
        data = [first], [second, val]
    monkeypatch.setattr(loop, "make_slides", lambda config: data)
    model = tiny_unet()
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        CheckpointError, match=r"epoch-001\.state\.pt: its run trained on other images"
    ):
        train(model, _resume(config, 1))
    assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True))


def test_resume_may_change_where_and_how_it_runs(finished_run) -> None:
    config, _ = finished_run
    # Threads, progress and the checkpoint folder cannot change the numbers: accepted.
    result = train(tiny_unet(), _resume(config, 1, num_threads=2, progress=False))
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]


def test_the_learning_rate_decays_to_zero_over_the_steps(finished_run) -> None:
    """Cosine annealing over exactly ``steps``: after step s of S the optimiser's rate is
    lr (1 + cos(pi s / S)) / 2, as each epoch's saved state holds it; zero after the last."""
    from segpipe.training import state_path

    config, result = finished_run
    rates = []
    for epoch in result["epochs"]:
        state = torch.load(
            state_path(f"{config.checkpoint_dir}/epoch-{epoch['epoch']:03d}.pt"), weights_only=True
        )
        rates.append(state["optimizer"]["param_groups"][0]["lr"])
    expected = [
        config.lr * (1 + math.cos(math.pi * e["step"] / config.steps)) / 2 for e in result["epochs"]
    ]
    assert [e["step"] for e in result["epochs"]] == [2, 4]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("other", "shown"),
    # Weights of another shape; and weights of the same shapes, in another model.
    [({"width": 8}, "'width': 8"), ({"dropout": 0.5}, "'dropout': 0.5")],
)
def test_resume_into_another_architecture_names_the_checkpoint(
    finished_run, other: dict, shown: str
) -> None:
    from segpipe.models import CheckpointError

    config, _ = finished_run
    with pytest.raises(CheckpointError, match=r"epoch-001\.pt") as err:
        train(tiny_unet(**other), _resume(config, 1))
    assert shown in str(err.value)


def _with_range_scaling(model: SegmentationModel) -> SegmentationModel:
    from segpipe.models.contract import PixelContract

    model.pixel_contract = PixelContract(
        channels=3, dtype="uint8", scaling="range", lo=(0.0,) * 3, hi=(200.0,) * 3
    )
    return model


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: _models_build(input_mean=0.2, input_std=0.6), "input_mean"),
        # The same mean, another spread: the weights would see other contrasts.
        (lambda: _models_build(input_std=0.6), "input_std"),
        (lambda: _models_build(class_names=("x", "y", "z")), "class_names"),
        (lambda: _with_range_scaling(tiny_unet()), "pixel_contract"),
    ],
    ids=["normalisation", "input std", "class names", "pixel scaling"],
)
def test_resume_into_a_model_fed_or_named_otherwise_is_refused(
    finished_run, build: Callable[[], SegmentationModel], field: str
) -> None:
    """Same architecture, other input or output: resuming would silently train (and save)
    the run's weights under another contract than they learnt."""
    from segpipe import models
    from segpipe.models import CheckpointError

    config, _ = finished_run
    with pytest.raises(CheckpointError, match=r"epoch-001\.pt") as err:
        train(build(), _resume(config, 1))
    saved = models.load(f"{config.checkpoint_dir}/epoch-001.pt")
    kept = getattr(saved, field)
    shown = kept.as_dict() if field == "pixel_contract" else list(kept)
    assert f"{field}={shown!r}" in str(err.value)


def _models_build(**kwargs: object) -> SegmentationModel:
    from segpipe import models

    options: dict = {"class_names": ("background", "tissue", "nucleus"), **kwargs}
    return models.build("unet", width=4, depth=2, padding="valid", dropout=0.0, **options)


def test_an_interrupted_state_write_keeps_the_previous_state(
    finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill or a full disk while ``epoch-NNN.state.pt`` is written must leave the one a
    resume wrote before whole, and no stray temporary file."""
    import shutil

    from segpipe import models
    from segpipe.models import CheckpointError
    from segpipe.training import state_path
    from segpipe.training.state import save_state

    config, _ = finished_run
    for name in ("epoch-001.pt", "epoch-001.state.pt"):
        shutil.copy(f"{config.checkpoint_dir}/{name}", tmp_path / name)
    before = state_path(tmp_path / "epoch-001.pt").read_bytes()
    model = tiny_unet()
    optimiser = torch.optim.Adam(model.parameters())
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.steps)
    rerun = replace(config, checkpoint_dir=str(tmp_path))
    real_save = torch.save

    def torn_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and "optimizer" in obj:  # the state, not the model
            if isinstance(f, (str, Path)):
                Path(f).write_bytes(b"PK\x03\x04 torn")
            else:
                f.write(b"PK\x03\x04 torn")  # type: ignore[attr-defined]
            raise RuntimeError("disk full")
        real_save(obj, f, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises((CheckpointError, RuntimeError), match="disk full"):
        save_state(
            model, optimiser, schedule, np.random.default_rng(0), rerun, 2, 1.0, [], [],
            [{"epoch": 1, "step": 2}], {}, data_sha256="0" * 64,
        )  # fmt: skip
    assert state_path(tmp_path / "epoch-001.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001.pt", "epoch-001.state.pt"]
    models.load(tmp_path / "epoch-001.pt")


@pytest.mark.parametrize("damage", ["empty", "junk", "first half", "last bytes cut"])
def test_resume_from_a_damaged_state_file_names_it(finished_run, tmp_path, damage: str) -> None:
    import shutil

    from segpipe.models import CheckpointError
    from segpipe.training import state_path

    config, _ = finished_run
    copy = tmp_path / "epoch-001.pt"
    shutil.copy(f"{config.checkpoint_dir}/epoch-001.pt", copy)
    data = state_path(f"{config.checkpoint_dir}/epoch-001.pt").read_bytes()
    damaged = {
        "empty": b"",
        "junk": b"not a torch file",
        "first half": data[: len(data) // 2],
        "last bytes cut": data[:-10],
    }
    state_path(copy).write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match=r"epoch-001\.state\.pt"):
        train(tiny_unet(), TrainConfig(**TINY, epochs=2, resume_from=str(copy)))


def _first_moments(opt: dict) -> dict:
    return opt["state"][sorted(opt["state"])[0]]


@pytest.mark.parametrize(
    ("lie", "named"),
    [
        (lambda s: _first_moments(s["optimizer"]).update(exp_avg=torch.zeros(7)), "exp_avg of "),
        (lambda s: s["optimizer"]["param_groups"][0].update(lr=123.0), r"lr=123\.0 at step"),
        (lambda s: s["optimizer"]["param_groups"][0].update(betas=(0.5, 0.9)), "betas="),
        (lambda s: s["scheduler"].update(T_max=10**6), "T_max=1000000"),
        (lambda s: s["scheduler"].update(base_lrs=[1.0]), r"base_lrs=\[1\.0\]"),
    ],
    ids=["moment shape", "rate", "betas", "schedule length", "base rate"],
)
def test_resume_from_a_state_whose_optimiser_lies_names_it(finished_run, tmp_path, lie, named):
    """torch restores an optimiser's and a schedule's state unchecked: a moment of another
    shape failed at the first step with a torch error naming no file, and an edited rate was
    trained with (a loss of 7e31)."""
    import shutil

    from segpipe.models import CheckpointError
    from segpipe.training import state_path

    config, _ = finished_run
    copy = tmp_path / "epoch-001.pt"
    shutil.copy(f"{config.checkpoint_dir}/epoch-001.pt", copy)
    state = torch.load(state_path(f"{config.checkpoint_dir}/epoch-001.pt"), weights_only=True)
    lie(state)
    torch.save(state, state_path(copy))
    with pytest.raises(CheckpointError, match=rf"epoch-001\.state\.pt: .*{named}"):
        train(tiny_unet(), TrainConfig(**TINY, epochs=2, resume_from=str(copy)))


def test_intensity_jitter_clips_to_what_a_saturated_scan_reaches() -> None:
    """Bounds: the pixels' dtype's range as the model scales it. 16-bit pixels scaled by a
    range keep their brightest above 1 (as at inference) up to 65535's scaled value; 8-bit
    pixels scaled by their dtype stay in [0, 1] (the shipped aerial model trained so)."""
    from segpipe.geometry.pixels import to_float01
    from segpipe.models.contract import PixelContract
    from segpipe.training import intensity_jitter
    from segpipe.training.augmentation import scaled_dtype_range

    contract = PixelContract(channels=1, dtype="uint16", scaling="range", lo=(0.0,), hi=(4000.0,))
    bounds = scaled_dtype_range(np.dtype("uint16"), 1, contract.scale)
    np.testing.assert_allclose(bounds, ([0.0], [65535 / 4000]))
    pixels = np.linspace(0, 6000, 64, dtype=np.float32).astype(np.uint16).reshape(8, 8, 1)
    image = contract.scale(pixels).transpose(2, 0, 1)
    assert image.max() > 1.4
    out = intensity_jitter(image, np.random.default_rng(3), 0.2, bounds)
    # An affine change of the grey values, all of them: a straight-line fit is exact.
    slope, offset = np.polyfit(image.ravel(), out.ravel(), 1)
    np.testing.assert_allclose(out, slope * image + offset, atol=1e-5)
    assert out.max() > 1.2
    # 8-bit data scaled by its dtype: clipped to [0, 1], as the scan saturates at 255.
    low, high = scaled_dtype_range(np.dtype("uint8"), 3, to_float01)
    np.testing.assert_array_equal(low, 0.0)
    np.testing.assert_array_equal(high, 1.0)
    grey = np.linspace(0, 1, 3 * 64, dtype=np.float32).reshape(3, 8, 8)
    clipped = [
        intensity_jitter(grey, np.random.default_rng(seed), 0.2, (low, high)) for seed in range(20)
    ]
    assert all(c.min() >= 0 and c.max() <= 1 for c in clipped)
    assert any(c.max() == 1 for c in clipped) and any(c.min() == 0 for c in clipped)


def test_train_on_aerial_scenes_with_border_weights() -> None:
    from segpipe import models
    from segpipe.synthetic import AERIAL_CLASS_NAMES
    from segpipe.training import class_names_for

    config = TrainConfig(
        **{**TINY, "slide_size": 128}, dataset="aerial", loss_weights="unet", separate_touching=True
    )
    assert class_names_for(config) == AERIAL_CLASS_NAMES
    torch.manual_seed(0)
    model = models.build("unet", class_names=AERIAL_CLASS_NAMES, width=4, depth=2)
    result = train(model, config)
    assert set(result["dice"]) == set(AERIAL_CLASS_NAMES)
    assert np.isfinite(result["final_loss"])
    with pytest.raises(ValueError, match="5 classes"):
        train(model, TrainConfig(**TINY))  # a 5-class model on 3-class tissue data


def test_loss_weight_maps_follow_the_config() -> None:
    from segpipe.training import loss_weight_maps
    from segpipe.training.losses import unet_weight_map

    slides = [tissue_slide(96, seed=s) for s in (0, 1)]
    assert loss_weight_maps(slides, TrainConfig(**TINY)) is None
    balanced = loss_weight_maps(slides, TrainConfig(**TINY, loss_weights="balanced"))
    counts = sum(np.bincount(s.labels.ravel(), minlength=3) for s in slides)
    expected = counts.sum() / (3 * counts)
    np.testing.assert_allclose(balanced[0], expected[slides[0].labels], rtol=1e-6)
    unet = loss_weight_maps(slides, TrainConfig(**TINY, loss_weights="unet", w0=5.0))
    np.testing.assert_allclose(
        unet[1],
        unet_weight_map(
            slides[1].instances, labels=slides[1].labels, w0=5.0, class_weights=expected
        ),
    )


@pytest.mark.parametrize("sigma_px", [1.5, 8.0])
def test_unet_loss_weights_decay_over_the_configured_sigma(sigma_px: float) -> None:
    """sigma_px is how far the border weight reaches into the gaps between objects: a map
    of another sigma weighs other pixels, silently."""
    from segpipe.training import loss_weight_maps
    from segpipe.training.losses import unet_weight_map

    slide = tissue_slide(128, seed=1)  # touching nuclei
    config = TrainConfig(**TINY, loss_weights="unet", w0=5.0, sigma_px=sigma_px)
    (got,) = loss_weight_maps([slide], config)
    counts = np.bincount(slide.labels.ravel(), minlength=3)
    table = counts.sum() / (3 * counts)

    def expected(sigma: float) -> np.ndarray:
        inst, labels = slide.instances, slide.labels
        return unet_weight_map(inst, labels=labels, w0=5.0, sigma=sigma, class_weights=table)

    np.testing.assert_allclose(got, expected(sigma_px), rtol=1e-6)
    assert np.abs(got - expected(5.0)).max() > 0.1  # the default sigma's map is another


def test_the_config_augmentation_carries_every_augmentation_setting() -> None:
    """The elastic grid (--elastic-grid), the displacement and the jitter all reach the
    sampler: a setting recorded in the checkpoint but not applied misdescribes the run."""
    from segpipe.training import Augmentation

    config = TrainConfig(elastic_std_px=2.0, elastic_grid=6, jitter=0.2)
    assert config.augmentation == Augmentation(elastic_std_px=2.0, elastic_grid=6, jitter=0.2)


def _touching(instances: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour in another object, by comparing shifted copies."""
    padded = np.pad(instances, 1)
    centre = padded[1:-1, 1:-1]
    out = np.zeros(instances.shape, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        other = padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]
        out |= (centre != 0) & (other != 0) & (other != centre)
    return out


def test_separate_touching_trains_on_labels_with_gaps_between_touching_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With separate_touching the sampler gets training labels whose touching objects are
    apart (the pixels where they meet given the class around them, instance 0); else a
    semantic model cannot learn to keep them apart, and the border weights miss the gaps."""
    from segpipe.training import loop

    class Sampled(Exception):
        pass

    given: list = []

    def spy(slides: list, *args: object, **kwargs: object) -> None:
        given.append(slides)
        raise Sampled

    monkeypatch.setattr(loop, "sample_pairs", spy)
    config = TrainConfig(**{**TINY, "slide_size": 128}, separate_touching=True)
    with pytest.raises(Sampled):
        train(tiny_unet(), config)
    originals = make_slides(config)[0]
    assert all(_touching(s.instances).any() for s in originals), "touching nuclei to part"
    for before, after in zip(originals, given[0], strict=True):
        border = _touching(before.instances)
        assert not _touching(after.instances).any()
        np.testing.assert_array_equal(after.instances[border], 0)
        np.testing.assert_array_equal(after.instances[~border], before.instances[~border])
        np.testing.assert_array_equal(after.labels[~border], before.labels[~border])
        # Where nuclei meet: the class of the pixels around the nuclei (tissue, 1).
        np.testing.assert_array_equal(after.labels[border], 1)


@pytest.mark.parametrize("loss_weights", ["balanced", "unet"])
def test_training_minimises_the_weighted_loss(
    monkeypatch: pytest.MonkeyPatch, loss_weights: str
) -> None:
    """With loss weights the loss recorded, and the gradient the step follows, are those of
    the weighted mean ``sum(w L) / sum(w)`` of the batch's per-pixel cross-entropy (numpy
    here, from the logits), not of the plain mean: the border weights must be what trains."""
    from segpipe.training import loop

    batches: list = []
    logits: list[np.ndarray] = []
    grads: list[np.ndarray] = []
    sample_pairs = loop.sample_pairs

    def spy(*args: object, **kwargs: object) -> object:  # the batch the step was given
        batches.append(sample_pairs(*args, **kwargs))
        return batches[-1]

    def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # the training step's forward, not validation's
            logits.append(output.detach().double().numpy())
            output.register_hook(lambda g: grads.append(g.double().numpy()))

    monkeypatch.setattr(loop, "sample_pairs", spy)
    torch.manual_seed(0)
    model = tiny_unet()
    model.register_forward_hook(keep)
    config = TrainConfig(**{**TINY, "steps": 1, "log_every": 1}, loss_weights=loss_weights)
    result = train(model, config)
    (batch,), (s,), (grad,) = batches, logits, grads
    labels, w = batch.labels, batch.weights.astype(np.float64)
    log_p = s - s.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    per_pixel = -np.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
    expected = (w * per_pixel).sum() / w.sum()
    # Weights that make a difference: the plain mean is another number.
    assert abs(per_pixel.mean() - expected) > 1e-3 * expected
    assert result["loss_history"] == [pytest.approx(expected, rel=1e-5)]
    one_hot = np.moveaxis(np.eye(s.shape[1])[labels], -1, 1)
    np.testing.assert_allclose(
        grad, w[:, None] * (np.exp(log_p) - one_hot) / w.sum(), rtol=1e-4, atol=1e-10
    )


def test_a_model_loaded_in_eval_mode_trains_with_its_dropout(tmp_path: Path) -> None:
    """models.load returns a model in eval mode, dropout off: a fine-tune of it must train as
    the same model in train mode does (dropout on), and end in eval mode."""
    from segpipe import models

    torch.manual_seed(0)
    path = models.save(tiny_unet(dropout=0.5), tmp_path / "start.pt")
    trained = []
    for is_training in (True, False):
        model = models.load(path)
        assert not model.training
        train(model.train(is_training), TrainConfig(**{**TINY, "steps": 2}))
        assert not model.training
        trained.append(list(model.parameters()))
    for a, b in zip(*trained, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_epochs_loss_is_the_mean_of_all_its_steps() -> None:
    """One history entry per step (log_every=1), two steps an epoch: each epoch's loss is the
    mean of its two steps' losses, not of the last log window's."""
    torch.manual_seed(0)
    result = train(tiny_unet(), TrainConfig(**{**TINY, "log_every": 1, "epochs": 2}))
    losses = result["loss_history"]
    assert len(losses) == 4
    assert [e["loss"] for e in result["epochs"]] == pytest.approx(
        [np.mean(losses[:2]), np.mean(losses[2:])], rel=1e-12
    )


def test_format_report_lists_classes_and_epochs() -> None:
    from segpipe.training import format_report

    torch.manual_seed(0)
    result = train(tiny_unet(), TrainConfig(**TINY, epochs=2))
    text = format_report(result)
    assert "nucleus" in text and "epoch   2" in text


def test_train_help_describes_steps_as_the_config_counts_them() -> None:
    import argparse

    from segpipe.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub.choices["train"]._actions}
    # --steps 6 --epochs 3: six steps in all, validated every two.
    config = TrainConfig(steps=6, epochs=3)
    assert config.steps_per_epoch == 2
    assert "in all" in helps["steps"] and "per epoch" not in helps["steps"]
    assert "ceil(steps / N)" in helps["epochs"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "folder"}, "train_folder"),
        ({"dataset": "satellite"}, "dataset"),
        ({"loss_weights": "paper"}, "loss_weights"),
        ({"epochs": 600}, "epochs"),
        ({"jitter": 1.5}, "jitter"),
        # Infinite: w0 and sigma failed deep in the weight map (OverflowError), an elastic
        # std trained on all-zero pairs; one past the patch scrambles it as surely.
        ({"w0": math.inf}, r"w0 must be finite .*sigma_px finite and > 0, got inf, 5\.0"),
        ({"sigma_px": math.inf}, r"w0 must be finite .* got 10\.0, inf"),
        ({"elastic_std_px": math.inf}, r"in \[0, TrainConfig\.patch\].*got inf \(patch 92"),
        ({"elastic_std_px": 93.0}, r"elastic_std_px must be in .*got 93\.0 \(patch 92\)"),
        # numpy's "expected non-negative integer" named no setting (segpipe train --seed -1)
        ({"seed": -1}, r"TrainConfig\.seed and val_seed must be >= 0, got -1, "),
        ({"seed": 9998}, r"val_seed=10000 is also .* pick another seed \(--seed\) or val_seed"),
        # A range of zero width scales nothing: refused here, not deep in measure_contract.
        ({"percentiles": (50.0, 50.0)}, r"0 <= lo < hi <= 100, got \(50\.0, 50\.0\)"),
        ({"percentiles": (90.0, 10.0)}, r"percentiles .* got \(90\.0, 10\.0\)"),
        ({"percentiles": (0.0, 101.0)}, r"percentiles .* got \(0\.0, 101\.0\)"),
    ],
)
def test_bad_new_options_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("steps", "epochs", "match"),
    [(10, 6, r"epochs=6 with steps=10 makes 5 epochs.*epochs=5 or 10, or steps=12"), (7, 5, "4")],
)
def test_epochs_that_would_end_early_are_refused(steps: int, epochs: int, match: str) -> None:
    """Epochs of ceil(steps / epochs) steps: 10 steps in epochs of 2 are 5 validations, not
    the 6 asked for. Every accepted count is the count the loop validates at."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(steps=steps, epochs=epochs)
    for n in range(1, 31):
        for e in range(1, n + 1):
            try:
                per = TrainConfig(steps=n, epochs=e).steps_per_epoch
            except ValueError:
                continue
            assert len([s for s in range(1, n + 1) if s % per == 0 or s == n]) == e


# --- what training reads and writes: folders, outputs, checkpoint folders ----------------


def _tiff_folder(root: Path, slides: list[SyntheticSlide], pixels: Callable) -> Path:
    """``root/images`` (``pixels(slide.image)``) and ``root/labels`` as TIFFs, named after
    ``root`` (training and validation names differ), and the tissue class names."""
    import tifffile

    for d in ("images", "labels"):
        (root / d).mkdir(parents=True)
    for i, s in enumerate(slides):
        tifffile.imwrite(root / "images" / f"{root.name}{i}.tif", pixels(s.image))
        tifffile.imwrite(root / "labels" / f"{root.name}{i}.tif", s.labels)
    (root / "classes.txt").write_text("background\ntissue\nnucleus\n")
    return root


def _twelve_bit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.uint16) * 16


@pytest.mark.parametrize(
    ("pixels", "kind"),
    [
        # The same scenes as 8-bit: scored with the 12-bit scaling, Dice 0.05 instead of 0.95.
        pytest.param(lambda image: image, r"uint8, 3 channel\(s\)", id="uint8"),
        pytest.param(lambda image: _twelve_bit(image[..., 0]), r"uint16, 1 channel", id="grey"),
    ],
)
def test_validation_images_of_another_kind_are_refused_before_training(
    tmp_path: Path, pixels: Callable, kind: str
) -> None:
    from segpipe.training import class_names_for, initial_model, pixel_contract_for

    slides = [tissue_slide(48, seed=s) for s in (1, 2, 9)]
    config = TrainConfig(
        **TINY,
        dataset="folder",
        train_folder=str(_tiff_folder(tmp_path / "train", slides[:2], _twelve_bit)),
        val_folder=str(_tiff_folder(tmp_path / "val", slides[2:], pixels)),
    )
    model = initial_model(
        "unet",
        class_names=class_names_for(config),
        contract=pixel_contract_for(config),
        width=4,
        depth=2,
        padding="valid",
    )
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=rf"val.images.val0\.tif is {kind}.*train are uint16, 3 channel\(s\)"
    ):
        train(model, config)
    for a, b in zip(initial, model.parameters(), strict=True):
        assert torch.equal(a, b), "refused before any step"


def test_resume_on_changed_folder_images_is_refused(tmp_path: Path) -> None:
    """A run resumed after its folder's images changed went on with other images, silently:
    its weights were neither the old run's nor a run's on the new images."""
    import tifffile

    from segpipe.models import CheckpointError
    from segpipe.training import class_names_for, initial_model, pixel_contract_for

    slides = [tissue_slide(48, seed=s) for s in (1, 2, 9)]
    config = TrainConfig(
        **{**TINY, "epochs": 2},
        dataset="folder",
        train_folder=str(_tiff_folder(tmp_path / "train", slides[:2], _twelve_bit)),
        val_folder=str(_tiff_folder(tmp_path / "val", slides[2:], _twelve_bit)),
        checkpoint_dir=str(tmp_path / "run"),
    )

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        names, contract = class_names_for(config), pixel_contract_for(config)
        return initial_model(
            "unet", class_names=names, contract=contract, width=4, depth=2, padding="valid"
        )

    straight = model()
    train(straight, config)
    resume = replace(config, checkpoint_dir=None, resume_from=str(tmp_path / "run/epoch-001.pt"))
    resumed = model()
    train(resumed, resume)  # the same images: resumed, bit for bit
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    image = tmp_path / "val" / "images" / "val0.tif"
    tifffile.imwrite(image, tifffile.imread(image)[::-1].copy())
    with pytest.raises(CheckpointError, match=r"epoch-001\.state\.pt: its run trained on other "
                       r"images.*images of .*train and .*val changed"):  # fmt: skip
        train(model(), resume)


def test_folders_are_read_with_the_folder_dataset_only() -> None:
    with pytest.raises(ValueError, match=r"train_folder='a'.*dataset='folder', not 'tissue'"):
        TrainConfig(train_folder="a", val_folder="b")
    with pytest.raises(ValueError, match=r"val_folder='b'.*not 'aerial'"):
        TrainConfig(dataset="aerial", val_folder="b")


def _cli_train(output: Path | str, *options: str) -> list[str]:
    """``segpipe train`` arguments for a tiny run on synthetic tissue."""
    tiny = "--steps 2 --batch-size 2 --patch 16 --slide-size 96 --num-slides 1 --val-size 48"
    return ["train", str(output), *tiny.split(), *options]


TINY_UNET = ("--width", "4", "--depth", "2")


def test_cli_folder_options_train_on_the_folders(tmp_path: Path, capsys) -> None:
    from segpipe import models
    from segpipe.cli import main

    slides = [tissue_slide(48, seed=s) for s in (1, 2, 9)]
    train_dir = _tiff_folder(tmp_path / "train", slides[:2], _twelve_bit)
    val_dir = _tiff_folder(tmp_path / "val", slides[2:], _twelve_bit)
    folders = ["--train-folder", str(train_dir), "--val-folder", str(val_dir)]
    out = tmp_path / "m.pt"
    assert main(_cli_train(out, *TINY_UNET, *folders, "--full-precision")) == 0
    assert torch.load(out, weights_only=True)["weights_dtype"] == "float32"  # not halved
    metrics = models.load(out).checkpoint_metrics
    assert metrics["validation"] == {
        "dataset": "folder",
        "train": str(train_dir),
        "val": str(val_dir),
    }
    assert metrics["confusion"] and sum(map(sum, metrics["confusion"])) == 48 * 48
    capsys.readouterr()
    assert main(_cli_train(tmp_path / "n.pt", "--dataset", "tissue", *folders)) == 2
    assert "dataset='folder', not 'tissue'" in capsys.readouterr().err
    assert not (tmp_path / "n.pt").exists()


def test_cli_checks_its_output_before_training(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing file needs --overwrite (a fine-tune in place too), a folder, a URL or an
    unwritable place is refused, each before a step is trained; nothing is written."""
    from segpipe import models
    from segpipe.cli import main

    monkeypatch.chdir(tmp_path)
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"\x89PNG not a checkpoint")
    (tmp_path / "folder.pt").mkdir()
    needs_overwrite = (
        "picture.png exists: replace it with overwrite=True (segpipe train --overwrite)"
    )
    refused = {
        str(picture): needs_overwrite,
        str(tmp_path / "folder.pt"): "folder.pt exists and is not a file",
        "s3://bucket/m.pt": "s3://bucket/m.pt: checkpoints are local files",
        "memory://m.pt": "memory://m.pt: checkpoints are local files",
    }
    if Path("/proc/self").is_dir():  # takes no new files, even from root
        refused["/proc/segpipe-test.pt"] = "segpipe-test.pt: cannot be written: /proc takes no"
    for output, message in refused.items():
        assert main(_cli_train(output)) == 2, output
        err = capsys.readouterr().err
        assert message in err, err
        assert "0/2 steps" not in err, "refused before training"
    assert picture.read_bytes() == b"\x89PNG not a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.pt", "picture.png"]

    # A fine-tune in place replaces its original only when told to.
    torch.manual_seed(0)
    original = models.save(tiny_unet(), tmp_path / "m.pt", metrics={"original": True})
    before = original.read_bytes()
    assert main(_cli_train(original, "--model", str(original))) == 2
    assert "m.pt exists" in capsys.readouterr().err
    assert original.read_bytes() == before
    assert main(_cli_train(original, "--model", str(original), "--overwrite")) == 0
    assert "original" not in models.load(original).checkpoint_metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.pt", "m.pt", "picture.png"]


def test_save_trained_replaces_its_output_with_the_final_file_only(
    finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted while it scores the float16 weights, save_trained leaves a fine-tune's
    original as it was, and no file without metrics; done, it replaced it."""
    from segpipe import models
    from segpipe.training import loop, save_trained

    config, result = finished_run
    torch.manual_seed(0)
    original = models.save(tiny_unet(), tmp_path / "m.pt", metrics={"original": True})
    before = original.read_bytes()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_trained(models.load(original), config, result, original, overwrite=True)
    assert original.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    monkeypatch.undo()
    saved = save_trained(models.load(original), config, result, original, overwrite=True)
    assert models.load(original).checkpoint_metrics["confusion"] == saved["confusion"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_save_trained_leaves_a_file_that_appeared_while_it_trained(
    finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_trained replaced its output whatever was there: a file made while the model
    trained (another run's model, a user's file) was lost without --overwrite. Now it is
    left as it is, also one made while the saved weights are scored, and the trained model
    is kept beside it."""
    from segpipe import models
    from segpipe.training import loop, save_trained

    config, result = finished_run
    out = tmp_path / "m.pt"
    out.write_bytes(b"PK\x03\x04 someone else's model")
    kept = tmp_path / f"m.unsaved-{os.getpid()}.pt"
    with pytest.raises(FileExistsError, match=rf"m\.pt exists .*{kept.name}.*overwrite=True"):
        save_trained(tiny_unet(), config, result, out)
    assert out.read_bytes() == b"PK\x03\x04 someone else's model"
    assert models.load(kept).checkpoint_metrics["loss_history"] == result["loss_history"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", kept.name]
    kept.unlink()
    out.unlink()

    scored = loop.evaluate_model

    def another_run_saves_meanwhile(*args: object, **kwargs: object) -> object:
        out.write_bytes(b"PK\x03\x04 another run's model")
        return scored(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_model", another_run_saves_meanwhile)
    with pytest.raises(FileExistsError, match=r"m\.pt exists"):
        save_trained(tiny_unet(), config, result, out)
    assert out.read_bytes() == b"PK\x03\x04 another run's model"
    kept.unlink()
    save_trained(tiny_unet(), config, result, out, overwrite=True)
    assert models.load(out).checkpoint_metrics["validation"]["dataset"] == "tissue"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_place_file_keeps_a_refused_model_of_a_long_name(tmp_path: Path) -> None:
    """Kept beside as <stem>.unsaved-<pid><suffix>, a name past 255 bytes: "could not be
    kept", and the model went with its scratch folder."""
    from segpipe.training.output import place_file

    out = tmp_path / ("m" * 250 + ".pt")
    out.write_bytes(b"PK\x03\x04 another run's model")
    written = tmp_path / "written.pt"
    written.write_bytes(b"hours of training")
    with pytest.raises(FileExistsError, match=r"the trained model is at .*\.unsaved-\d+\.pt"):
        place_file(written, out, overwrite=False)
    (kept,) = tmp_path.glob("*.unsaved-*.pt")
    assert kept.read_bytes() == b"hours of training" and len(os.fsencode(kept.name)) <= 255
    assert out.read_bytes() == b"PK\x03\x04 another run's model"


def test_a_link_to_nothing_at_the_output_is_refused_before_training(tmp_path: Path) -> None:
    """It passed the check (it "does not exist"), and the trained model was refused it."""
    from segpipe.training import check_output

    out = tmp_path / "m.pt"
    out.symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(FileExistsError, match=r"m\.pt exists"):
        check_output(out)
    assert check_output(out, overwrite=True) == out


def test_save_trained_leaves_a_file_made_at_the_last_instant(
    finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that the output is free, then a rename over it, leaves a moment in which
    another process's file made between the two is replaced: the file must be placed by an
    operation that fails where a file is. Here the other file is made just before the call
    that places the model, whichever call that is."""
    from segpipe import models
    from segpipe.training import save_trained

    config, result = finished_run
    out = tmp_path / "m.pt"
    armed: list[bool] = []
    real_save, real_link, real_replace = models.save, os.link, os.replace

    def save(*args: object, **kwargs: object) -> Path:
        written = real_save(*args, **kwargs)
        armed.append(kwargs.get("metrics") is not None)  # the final file is written
        return written

    def another_writes_first(real: Callable) -> Callable:
        def call(src: object, dst: object, *args: object, **kwargs: object) -> None:
            if armed[-1:] == [True] and Path(os.fsdecode(dst)) == out and not out.exists():
                out.write_bytes(b"made at the last instant")
            real(src, dst, *args, **kwargs)

        return call

    monkeypatch.setattr(models, "save", save)
    monkeypatch.setattr(os, "link", another_writes_first(real_link))
    monkeypatch.setattr(os, "replace", another_writes_first(real_replace))
    with pytest.raises(FileExistsError, match=r"m\.pt exists"):
        save_trained(tiny_unet(), config, result, out, half=False)
    assert out.read_bytes() == b"made at the last instant"


def test_cli_train_leaves_a_file_that_appeared_while_it_trained(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output was checked before training only; the save then replaced whatever was
    there, --overwrite or not."""
    from segpipe import training
    from segpipe.cli import main

    out = tmp_path / "m.pt"
    real_train = training.train

    def others_write_meanwhile(*args: object, **kwargs: object) -> dict:
        result = real_train(*args, **kwargs)
        out.write_bytes(b"a user's file")
        return result

    monkeypatch.setattr(training, "train", others_write_meanwhile)
    assert main(_cli_train(out, *TINY_UNET)) == 2
    assert "m.pt exists" in capsys.readouterr().err
    assert out.read_bytes() == b"a user's file"
    # --overwrite replaces a checkpoint, never a file of another kind (an image named by
    # mistake): it replaced any file there
    assert main(_cli_train(out, *TINY_UNET, "--overwrite")) == 2
    assert "m.pt exists and is no checkpoint segpipe wrote" in capsys.readouterr().err
    assert out.read_bytes() == b"a user's file"
    monkeypatch.setattr(training, "train", real_train)
    out.write_bytes(b"PK\x03\x04 another run's model")
    assert main(_cli_train(out, *TINY_UNET, "--overwrite")) == 0
    from segpipe import models

    assert models.load(out).checkpoint_metrics["loss_history"]


def test_a_validation_folder_numbering_classes_otherwise_is_refused(tmp_path: Path) -> None:
    """The validation folder's classes.txt was ignored: read with the training folder's
    names, its id 1 (stroma) was scored as nucleus, per-class Dice swapped without a word."""
    import re

    slides = [tissue_slide(48, seed=s) for s in (1, 2, 9)]
    train_dir = _tiff_folder(tmp_path / "train", slides[:2], _twelve_bit)
    val_dir = _tiff_folder(tmp_path / "val", slides[2:], _twelve_bit)
    (val_dir / "classes.txt").write_text("background\nnucleus\ntissue\n")
    config = TrainConfig(
        **TINY, dataset="folder", train_folder=str(train_dir), val_folder=str(val_dir)
    )
    with pytest.raises(ValueError, match="the same id must mean the same class") as refused:
        make_slides(config)
    message = str(refused.value)
    for named in (
        f"{val_dir / 'classes.txt'} names the class ids ['background', 'nucleus', 'tissue']",
        f"{train_dir / 'classes.txt'} names them ['background', 'tissue', 'nucleus']",
    ):
        assert re.search(re.escape(named), message), message
    (val_dir / "classes.txt").write_text("background\ntissue\nnucleus\n")  # alike: read
    assert make_slides(config)[1][0].class_names == ("background", "tissue", "nucleus")


def test_a_val_tile_off_the_models_multiple_is_refused_before_training() -> None:
    """Found at the first validation, after an epoch of training thrown away."""
    model = tiny_unet()  # depth 2: multiple 4
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"TrainConfig\.val_tile 18 px .* multiple 4; use 20"):
        train(model, TrainConfig(**{**TINY, "val_tile": 18}))
    assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True))


def test_the_saved_model_records_what_its_weights_reproduce_on(tmp_path: Path) -> None:
    """'threads' was torch's count at the save, which train() had put back to the caller's,
    not the count the run trained with; the CPU's instruction set (AVX2 and AVX-512 round
    differently) was not recorded at all."""
    from segpipe import models
    from segpipe.training import save_trained

    assert torch.get_num_threads() == 1  # one_torch_thread
    config = TrainConfig(**{**TINY, "num_threads": 2})
    result = train(tiny_unet(), config)
    assert (result["threads"], torch.get_num_threads()) == (2, 1)
    metrics = save_trained(tiny_unet(), config, result, tmp_path / "m.pt", half=False)
    stored = models.load(tmp_path / "m.pt").checkpoint_metrics
    for m in (metrics, stored):
        assert m["threads"] == 2
        assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert m["numpy"] == np.__version__
    # A resume may train on another count: the file then records none (its weights reproduce
    # on no one count); on the same count, that count.
    run = TrainConfig(**{**TINY, "num_threads": 1, "epochs": 2}, checkpoint_dir=str(tmp_path / "r"))
    train(tiny_unet(), run)
    first = str(tmp_path / "r" / "epoch-001.pt")
    for threads, recorded in ((1, 1), (2, None)):
        again = replace(run, checkpoint_dir=None, resume_from=first, num_threads=threads)
        assert train(tiny_unet(), again)["threads"] == recorded


def test_a_run_does_not_write_over_another_runs_checkpoints(finished_run, tmp_path: Path) -> None:
    """A folder holding epoch checkpoints takes only those of the run they are: refused
    before training for a new run (even with the same settings: it is not told to continue)
    and for a resume whose files there are another run's; a resume of their run continues."""
    import re
    import shutil

    config, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(str(config.checkpoint_dir), run)
    mine = replace(config, checkpoint_dir=str(run))
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    folder = re.escape(str(run))
    for other in (replace(mine, seed=7), mine):
        model = tiny_unet()
        initial = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(
            ValueError, match=rf"{folder} already holds epoch-001\.pt.*checkpoint-dir.*--resume"
        ):
            train(model, other)
        assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files

    resume = replace(mine, resume_from=str(run / "epoch-001.pt"))
    assert train(tiny_unet(), resume)["checkpoint"] == str(run / "epoch-002.pt")
    # epoch-002.pt of a seed-7 run: the resume of the seed-0 one must not replace it.
    payload = torch.load(run / "epoch-002.pt", weights_only=True)
    payload["metrics"]["config"]["seed"] = 7
    torch.save(payload, run / "epoch-002.pt")
    seven = (run / "epoch-002.pt").read_bytes()
    with pytest.raises(ValueError, match=r"epoch-002\.pt, of another run: it trained with seed=7"):
        train(tiny_unet(), resume)
    assert (run / "epoch-002.pt").read_bytes() == seven


def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_training(tmp_path) -> None:
    """Found at the first epoch's end before, after the training: with one epoch, the model
    was never saved."""
    a_file = tmp_path / "notadir"
    a_file.write_bytes(b"")
    model = tiny_unet()
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"checkpoint_dir .*notadir \(--checkpoint-dir\) is a file"
    ):
        train(model, TrainConfig(**TINY, checkpoint_dir=str(a_file)))
    with pytest.raises(
        NotADirectoryError, match=r"notadir/run cannot be written: .*notadir is a file"
    ):
        train(model, TrainConfig(**TINY, checkpoint_dir=str(a_file / "run")))
    assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True))


def test_a_fine_tune_on_a_constant_channel_keeps_a_std_floor() -> None:
    """A channel of one value has std 0; the contract keeps 1e-3 for it (as measure_contract
    does), and the other channels their statistics, computed here in numpy."""
    from types import SimpleNamespace

    from segpipe.models.contract import PixelContract
    from segpipe.training.config import training_contract

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image[..., 2] = 200
    net = tiny_unet()
    net.pixel_contract = PixelContract(3, dtype="uint8")
    contract = training_contract(net, TrainConfig(), [SimpleNamespace(image=image)])
    scaled = image.reshape(-1, 3) / 255
    assert contract.mean == pytest.approx(tuple(scaled.mean(axis=0)), rel=1e-5)
    assert contract.std == pytest.approx((*scaled[:, :2].std(axis=0), 1e-3), rel=1e-5)


def test_the_validation_scene_has_its_own_size_and_seed() -> None:
    config = TrainConfig(slide_size=96, num_slides=1, val_size=48, val_seed=3)
    (train_slide,), (val,) = make_slides(config)
    assert train_slide.shape == (96, 96)
    expected = tissue_slide(48, seed=3)
    np.testing.assert_array_equal(val.image, expected.image)
    np.testing.assert_array_equal(val.labels, expected.labels)


@pytest.mark.parametrize(
    ("dtype", "names"), [(np.uint8, ("red", "green", "blue")), (np.uint16, None)]
)
def test_only_8_bit_three_channel_images_are_named_red_green_blue(
    dtype: type, names: tuple[str, ...] | None
) -> None:
    """A 3-band uint16 raster (e.g. near-infrared, red, green) is not taken for RGB: its
    channels stay unnamed."""
    from segpipe.training import pixel_contract_for

    image = np.random.default_rng(0).integers(0, 200, (32, 32, 3)).astype(dtype)
    slide = SyntheticSlide(image, np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.int32))
    contract = pixel_contract_for(TrainConfig(), [slide])
    assert contract.dtype == np.dtype(dtype).name
    assert contract.channel_names == names


def test_the_data_fingerprint_tells_shapes_and_dtypes_apart() -> None:
    """Images of the same bytes in another shape or dtype are other data (a resume on them is
    refused); the same arrays again are the same data."""
    from segpipe.training.state import data_fingerprint

    pixels = np.arange(48, dtype=np.uint8)

    def image(array: np.ndarray) -> SyntheticSlide:
        side = array.shape[:2]
        return SyntheticSlide(array, np.zeros(side, np.uint8), np.zeros(side, np.int32))

    square, wide = pixels.reshape(4, 4, 3), pixels.reshape(2, 8, 3)
    signed = pixels.view(np.int8).reshape(4, 4, 3)
    prints = [data_fingerprint([image(a)]) for a in (square, wide, signed, square.copy())]
    assert len(set(prints[:3])) == 3
    assert prints[3] == prints[0]


def test_the_data_fingerprint_tells_which_set_holds_each_image() -> None:
    """The same images split otherwise between training and validation are another run's
    data (a former validation image trained on); and an image's instances are its data."""
    from segpipe.training.state import data_fingerprint

    a, b, c = (tissue_slide(32, seed=s) for s in (1, 2, 3))
    split = data_fingerprint([a, b], [c])
    assert data_fingerprint([a], [b, c]) != split
    assert data_fingerprint([a, b, c], []) != split
    assert data_fingerprint([a, b], [c]) == split
    other_objects = replace(a, instances=np.ones_like(a.instances))  # the same labels
    assert data_fingerprint([other_objects, b], [c]) != split


def test_a_fine_tuned_contract_measures_every_column_of_large_images():
    """Its statistics took every k-th pixel: where k divides the width, the same columns of
    every row (here the dark ones only: mean 0, not 0.5)."""
    from types import SimpleNamespace

    from segpipe import models
    from segpipe.models.contract import PixelContract
    from segpipe.training.config import training_contract

    image = np.zeros((1000, 2000, 1), np.uint16)  # 2 M px: above the million sampled
    image[:, 1::2] = 1000
    net = models.build("unet", class_names=("a", "b"), in_channels=1, width=4, depth=2)
    net.pixel_contract = PixelContract(
        channels=1, dtype="uint16", scaling="range", lo=(0.0,), hi=(1000.0,)
    )
    contract = training_contract(net, TrainConfig(), [SimpleNamespace(image=image)])
    assert contract.mean == pytest.approx((0.5,), abs=0.01)
    assert contract.std == pytest.approx((0.5,), abs=0.01)


def test_a_fine_tune_records_the_pixel_size_given_else_its_images_else_its_own() -> None:
    """train --model CKPT --pixel-size 0.25 recorded the checkpoint's 0.5; and images of
    mixed sizes warned that the model records none, though it kept the checkpoint's."""
    import warnings

    from segpipe.models.contract import PixelContract
    from segpipe.training.config import training_contract
    from segpipe.training.datasets import FolderImage

    def checkpoint() -> SegmentationModel:
        net = tiny_unet()
        rgb = ("red", "green", "blue")
        net.pixel_contract = PixelContract(3, channel_names=rgb, dtype="uint8", pixel_size_um=0.5)
        return net

    net = checkpoint()
    train(net, TrainConfig(**TINY, pixel_size_um=0.25))
    assert net.pixel_contract.pixel_size_um == 0.25
    rng = np.random.default_rng(0)
    labels = np.zeros((16, 16), np.uint8)
    mixed = [
        FolderImage(
            rng.integers(0, 255, (16, 16, 3), np.uint8), labels, None, ("a", "b", "c"), str(n), n
        )
        for n in (0.25, 1.0)
    ]
    folder = TrainConfig(dataset="folder", train_folder="train", val_folder="val")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training_contract(checkpoint(), folder, mixed).pixel_size_um == 0.5
        given = replace(folder, pixel_size_um=0.25)
        assert training_contract(checkpoint(), given, mixed).pixel_size_um == 0.25
        # Images all of 0.25 um tune the model to 0.25 um: the checkpoint's 0.5 was kept, and
        # segment then ran the tuned model on another pyramid level than it was tuned on.
        alike = [replace(image, pixel_size_um=0.25) for image in mixed]
        assert training_contract(checkpoint(), folder, alike).pixel_size_um == 0.25


def test_a_foreign_model_is_refused_before_training_not_when_saved(tmp_path: Path) -> None:
    """A TorchScript file with a sidecar loads wherever a checkpoint goes, but training can
    only save segpipe's own architectures: the run trained to its end, then failed to save
    (TypeError, a traceback), its training lost."""
    from torch import nn

    from segpipe.models import write_sidecar
    from segpipe.training import initial_model

    path = tmp_path / "theirs.pt"
    torch.jit.save(torch.jit.script(nn.Conv2d(3, 2, 1)), str(path))
    write_sidecar(path, class_names=["a", "b"], geometry=Geometry(halo=0))
    with pytest.raises(ValueError, match=r"theirs\.pt is a WrappedModel .*fine-tune it where"):
        initial_model(str(path), class_names=["a", "b"])


def test_a_diverged_run_stops_at_its_first_non_finite_loss() -> None:
    """It trained on to validation, which failed with the model's NaN output (a traceback
    naming an in-memory array); nothing said the run had diverged."""
    with pytest.raises(ValueError, match=r"diverged at step \d: the loss is nan.*lr=1e\+30, --lr"):
        train(tiny_unet(), TrainConfig(**{**TINY, "lr": 1e30}))


def test_weights_beyond_float16_are_saved_as_float32_with_a_warning(
    finished_run, tmp_path: Path
) -> None:
    """A trained model float16 cannot hold was lost at the save, after its training, with an
    error naming a hidden temporary file."""
    from segpipe import models
    from segpipe.training import save_trained

    config, result = finished_run
    model = tiny_unet()
    key, weight = next((k, t) for k, t in model.state_dict().items() if t.ndim == 4)
    with torch.no_grad():
        weight.view(-1)[0] = 1e5
    out = tmp_path / "big.pt"
    with pytest.warns(UserWarning, match=rf"big\.pt: weight '{key}' .* beyond float16's 65504"):
        save_trained(model, config, result, out)
    saved = models.load(out)
    assert saved.state_dict()[key].view(-1)[0] == 1e5
    torch.testing.assert_close(saved.state_dict()[key], model.state_dict()[key], rtol=0, atol=0)


def test_options_for_a_model_that_does_not_exist_say_it_does_not() -> None:
    from segpipe.training import initial_model

    with pytest.raises(ValueError, match=r"no shipped model or checkpoint file 'nosuch'"):
        initial_model("nosuch", class_names=["a", "b"], width=2)


def test_a_killed_saves_copy_is_cleared_by_the_next_save(finished_run, tmp_path: Path) -> None:
    """Killed while it scored the float16 weights, a save left a whole model beside the
    output, hidden, for good. Another live process's copy is its own, and stays."""
    import hashlib
    import socket
    import subprocess
    import sys

    from segpipe.training import save_trained

    config, result = finished_run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]
    left = tmp_path / f".m.pt.{host}-{dead}-x.part"
    live = tmp_path / f".m.pt.{host}-{os.getppid()}-x.part"
    for copy in (left, live):
        copy.write_bytes(b"a model")
    save_trained(tiny_unet(), config, result, tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "m.pt"]


@pytest.mark.parametrize("name", ["m" * 240 + ".pt", "é" * 118 + ".pt"], ids=["ascii", "utf-8"])
def test_a_model_of_a_long_name_is_saved(finished_run, tmp_path: Path, name: str) -> None:
    """Its scored copy's name took the whole output name, past the 255 bytes a name may have:
    the trained model was lost at the save (and 200 characters of 2-byte letters are 400)."""
    from segpipe import models
    from segpipe.training import save_trained

    config, result = finished_run
    out = tmp_path / name
    save_trained(tiny_unet(), config, result, out)
    assert models.load(out).checkpoint_metrics is not None
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_resume_from_a_checkpoint_killed_before_its_state_names_the_one_before(
    finished_run: tuple[TrainConfig, dict], tmp_path
) -> None:
    """A kill between epoch-002.pt and its state file: the message points at epoch-001.pt."""
    import re
    import shutil

    from segpipe.training import state_path

    config, _ = finished_run
    run = Path(str(config.checkpoint_dir))
    for name in ("epoch-001.pt", "epoch-001.state.pt", "epoch-002.pt"):
        shutil.copy(run / name, tmp_path / name)
    assert not state_path(tmp_path / "epoch-002.pt").exists()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"resume from {tmp_path / 'epoch-001.pt'}")
    ):
        train(
            tiny_unet(), TrainConfig(**TINY, epochs=2, resume_from=str(tmp_path / "epoch-002.pt"))
        )


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("forward", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")),
        ("forward", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")),
        ("backward", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")),
        ("forward", RuntimeError("a bug")),  # no memory error: passes as it is
    ],
)
def test_a_step_out_of_memory_names_the_options_that_size_it(
    monkeypatch: pytest.MonkeyPatch, where: str, error: Exception
) -> None:
    """A batch that fits but whose forward (or backward) pass does not ended in torch's
    allocator traceback, naming a byte count and no option."""

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    config = TrainConfig(steps=1, batch_size=2, patch=16, slide_size=64, num_slides=1,
                         val_size=32, val_tile=16, progress=False)  # fmt: skip
    model = tiny_unet()
    side = model.geometry.input_size(16)
    monkeypatch.setattr(*((model, "forward") if where == "forward" else (torch.Tensor, "backward")),
                        fail)  # fmt: skip
    if str(error) == "a bug":
        with pytest.raises(RuntimeError, match=r"^a bug$"):
            train(model, config)
        return
    said = rf"batch of 2 \(--batch-size\) patches of 16 px \(--patch; windows of {side} px a side"
    with pytest.raises(ValueError, match=rf"{said} .* lower --patch or --batch-size"):
        train(model, config)


def test_a_resumed_step_out_of_memory_does_not_advise_options_a_resume_refuses(
    finished_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "lower --patch or --batch-size", which the resume then refuses to change."""
    config, _ = finished_run
    model = tiny_unet()

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")

    monkeypatch.setattr(model, "forward", fail)
    with pytest.raises(ValueError, match=r"give it more memory, or train anew with a lower"):
        train(model, _resume(config, 1))


def test_the_loop_samples_with_the_configs_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The elastic deformation and the jitter a config asks for reach the sampler in the
    training loop itself, not only config.augmentation: a run recorded as augmented that
    trained on flips alone misdescribes itself (its checkpoint says otherwise)."""
    from segpipe.training import loop

    class Sampled(Exception):
        pass

    given: list[inspect.BoundArguments] = []
    signature = inspect.signature(loop.sample_pairs)

    def spy(*args: object, **kwargs: object) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given.append(bound)
        raise Sampled

    monkeypatch.setattr(loop, "sample_pairs", spy)
    config = TrainConfig(**TINY, elastic_std_px=2.0, elastic_grid=4, jitter=0.2)
    with pytest.raises(Sampled):
        train(tiny_unet(), config)
    expected = Augmentation(elastic_std_px=2.0, elastic_grid=4, jitter=0.2)
    assert given[0].arguments["augmentation"] == expected


def test_resume_from_the_final_checkpoint_validates_nothing_again(
    finished_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing left to train: the result is the validation the checkpoint kept. Validating
    the same weights again costs a whole validation (the slides' inference) for the
    numbers the checkpoint holds already."""
    from segpipe.training import loop

    config, result = finished_run
    calls: list[object] = []
    evaluate_model = loop.evaluate_model

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_model", spy)
    again = train(tiny_unet(), _resume(config, 2))
    assert calls == []
    assert again["confusion"] == result["confusion"]


def test_a_resume_checks_only_the_epochs_it_will_write(finished_run, tmp_path: Path) -> None:
    """A resume one epoch in writes epoch-002.pt and after: another run's epoch-001.pt in its
    folder is not written over, so it does not stop the resume, and stays as it was."""
    config, _ = finished_run
    folder = tmp_path / "next"
    folder.mkdir()
    payload = torch.load(f"{config.checkpoint_dir}/epoch-001.pt", weights_only=True)
    payload["metrics"]["config"]["seed"] = 7  # epoch-001.pt of a seed-7 run
    torch.save(payload, folder / "epoch-001.pt")
    theirs = (folder / "epoch-001.pt").read_bytes()
    resume = replace(_resume(config, 1), checkpoint_dir=str(folder))
    assert train(tiny_unet(), resume)["checkpoint"] == str(folder / "epoch-002.pt")
    assert (folder / "epoch-001.pt").read_bytes() == theirs
