"""A caller's module lent to this process's runs (segpipe/execution/lending.py)."""

import pytest
import torch

from segpipe import models
from segpipe.execution.lending import model_given_back
from segpipe.execution.predictor import InferenceConfig, Predictor


def tiny_unet() -> models.SegmentationModel:
    """A random valid-padding U-Net, in training mode as a caller mid-training holds it."""
    torch.manual_seed(0)
    net = models.build("unet", in_channels=3, width=4, depth=2, padding="valid", dropout=0.0)
    return net.train()


def test_a_model_lent_to_runs_side_by_side_is_given_back_by_the_last() -> None:
    """Runs in this process share the caller's module (an archive's images, one loaded model):
    the last to end, however it ends, gives it back as it was (modes; parameters, gradients
    and buffers on their device, in their layout, the parameters themselves an optimizer
    holds); an earlier one leaves it to the runs still using it."""
    model = tiny_unet()
    side = model.geometry.input_size(8)
    model(torch.rand(1, 3, side, side)).sum().backward()  # mid-training: gradients
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def runs_side_by_side() -> None:
        with model_given_back(model):
            with model_given_back(model):
                Predictor(model, InferenceConfig(device="cpu"))
            assert not model.training, "still lent to the first run"
            assert not all(p.is_contiguous() for p in model.parameters()), "channels-last"
            raise RuntimeError("the first run failed")

    with pytest.raises(RuntimeError, match="failed"):
        runs_side_by_side()
    assert all(m.training for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for p in params:
        assert p.is_contiguous() and p.grad is not None and p.grad.is_contiguous()
    for key, value in model.state_dict().items():
        assert value.is_contiguous(), key
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_runs_sharing_a_module_on_two_devices_are_refused() -> None:
    """One module lent to two runs of this process cannot be on two devices: the second run's
    predictor would move it from under the first's passes. The meta device stands in for a
    GPU; the refused run leaves the first one's loan as it was."""
    model = tiny_unet()
    with model_given_back(model, torch.device("cpu")):
        refused = pytest.raises(ValueError, match="another run in this process on cpu")
        with refused, model_given_back(model, torch.device("meta")):
            pass
        with model_given_back(model, torch.device("cpu")):  # the same device: shared
            model.eval()
        assert not model.training, "still lent to the first run"
    assert model.training, "given back by the last run"
