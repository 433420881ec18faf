"""Predictor and window_probabilities: the same numbers as calling the model by hand,
whatever the batching; the in-memory one leaves the model as it is."""

import contextlib

import numpy as np
import pytest
import torch
from test_execution import one_torch_thread  # noqa: F401 (autouse fixture)

from segpipe import models
from segpipe.execution.predictor import (
    SHARING_ENV,
    InferenceConfig,
    Predictor,
    missing_device,
    resolve_device,
    window_probabilities,
)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return models.build("unet", class_names=("a", "b", "c"), width=4, depth=2).eval()


def by_hand(net, windows):
    x = torch.from_numpy(windows.astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        return torch.softmax(net(x), 1).numpy()


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_predictor_matches_a_forward_pass(net, batch_size):
    n = net.geometry.input_size(16)
    windows = np.random.default_rng(0).integers(0, 256, (5, n, n, 3), dtype=np.uint8)
    got = Predictor(net, InferenceConfig(device="cpu", batch_size=batch_size))(windows)
    assert got.shape == (5, 3, 16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, by_hand(net, windows), atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_uint16_input_is_scaled_to_unit_range(net):
    n = net.geometry.input_size(8)
    w8 = np.random.default_rng(1).integers(0, 256, (1, n, n, 3), dtype=np.uint8)
    w16 = w8.astype(np.uint16) * 257  # same intensities on the 16-bit scale
    p = Predictor(net, InferenceConfig(device="cpu"))
    np.testing.assert_allclose(p(w8), p(w16), atol=1e-5)


def test_autocast_path_runs_on_cpu_and_stays_close(net):
    """The GPU's bf16 autocast path, exercised on the CPU through the same code."""
    n = net.geometry.input_size(16)
    windows = np.random.default_rng(2).integers(0, 256, (2, n, n, 3), dtype=np.uint8)
    exact = Predictor(net, InferenceConfig(device="cpu", amp=False))(windows)
    amp = Predictor(net, InferenceConfig(device="cpu", amp=True))
    assert amp.amp is True
    got = amp(windows)
    assert got.dtype == np.float32, "softmax in float32 whatever autocast did"
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert np.abs(got - exact).max() < 0.05


def test_auto_device_and_refusals(net):
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="batch_size"):
        InferenceConfig(batch_size=0)
    for threads in (0, -1, 2.5, "2", True):  # torch's refusal named no setting, at the run
        with pytest.raises(ValueError, match=f"threads must be .*got {threads!r}"):
            InferenceConfig(threads=threads)
    with pytest.raises(ValueError, match=r"\(N, Y, X, C\)"):
        Predictor(net, InferenceConfig(device="cpu"))(np.zeros((4, 4, 3), np.uint8))


def test_window_probabilities_match_a_forward_pass_and_leave_the_model_alone(net):
    n = net.geometry.input_size(16)
    windows = np.random.default_rng(3).integers(0, 256, (3, n, n, 3), dtype=np.uint8)
    net.train()
    got = window_probabilities(net, windows)
    assert got.shape == (3, 3, 16, 16) and got.dtype == np.float32
    assert net.training, "the caller's mode is kept"
    assert all(p.is_contiguous() for p in net.parameters()), "no channels-last conversion"
    net.eval()
    np.testing.assert_allclose(window_probabilities(net, windows), by_hand(net, windows), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, Y, X, C\)"):
        window_probabilities(net, windows[0])


@pytest.mark.parametrize("contract", [None, "dtype", "range"])
def test_uint8_windows_are_scaled_on_the_device_bit_for_bit(net, contract):
    """uint8 windows go to forward as they are (a quarter of the bytes to move) and are scaled
    there to exactly what the numpy scaler gives."""
    from segpipe.models.contract import PixelContract

    if contract == "range":
        net.pixel_contract = PixelContract(
            channels=3, scaling="range", lo=(10.0, 0.0, 3.5), hi=(240.0, 255.0, 200.25)
        )
    elif contract == "dtype":
        net.pixel_contract = PixelContract(channels=3)
    predictor = Predictor(net, InferenceConfig(device="cpu"))
    n = net.geometry.input_size(16)
    windows = np.random.default_rng(3).integers(0, 256, (3, n, n, 3), dtype=np.uint8)
    prepared = predictor.prepare(windows)
    assert prepared.dtype == np.uint8 and prepared.flags.c_contiguous
    scaled = np.ascontiguousarray(predictor.scale(windows))
    assert scaled.dtype == np.float32
    if contract == "range":  # the contract's scaling, not the dtype rule
        assert not np.array_equal(scaled, windows.astype(np.float32) / 255)
    np.testing.assert_array_equal(
        predictor.forward(prepared).result(), predictor.forward(scaled).result()
    )
    # Other dtypes are scaled in the caller's thread, as before.
    assert predictor.prepare(windows.astype(np.uint16) * 257).dtype == np.float32


def test_the_threads_setting_is_torchs_on_the_cpu(net):
    """(one_torch_thread, autouse, has set torch's threads to 1 first.)"""
    predictor = Predictor(net, InferenceConfig(device="cpu", threads=2))
    assert torch.get_num_threads() == 2
    n = net.geometry.input_size(8)
    assert predictor(np.zeros((1, n, n, 3), np.uint8)).shape == (1, 3, 8, 8)


def test_devices_torch_sees_are_the_ones_asked_for(monkeypatch):
    """As with one CUDA GPU: "auto" is it, cuda:0 is there, cuda:1 is not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    assert missing_device("cuda:0") is None and missing_device("cuda") is None
    assert missing_device("cuda:1") == "torch sees 1 CUDA GPU(s), cuda:0 to cuda:0"
    with pytest.raises(RuntimeError, match="'cuda:1' asked for"):
        resolve_device("cuda:1")


def test_a_gpus_budget_is_two_fifths_of_its_free_memory(net, monkeypatch):
    predictor = Predictor(net, InferenceConfig(device="cpu"))
    predictor.device = torch.device("cuda", 0)  # as a GPU's predictor asks
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10_000, 80_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    assert predictor.memory_budget() == 4_000
    # worker processes sharing the GPU each measured the same free memory: a part each
    monkeypatch.setenv(SHARING_ENV, "4")
    assert predictor.memory_budget() == 1_000
    monkeypatch.setenv(SHARING_ENV, "")
    assert predictor.memory_budget() == 4_000


def test_a_gpus_budget_counts_what_its_allocator_caches_as_free(net, monkeypatch):
    """torch's caching allocator keeps the blocks runs freed: the driver's free memory falls
    run after run while this process could still use them. Counted as free, each run of a
    process gets the same budget, so the same exact windows (not new shapes, other bits)."""
    predictor = Predictor(net, InferenceConfig(device="cpu"))
    predictor.device = torch.device("cuda", 0)
    reserved = [0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (10_000 - reserved[0], 80_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: reserved[0])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 500)
    budgets = []
    for cached in (500, 3_000, 6_000):  # what a run leaves cached, growing
        reserved[0] = cached
        budgets.append(predictor.memory_budget())
    assert budgets == [3_800, 3_800, 3_800]  # 0.4 of (10 000 - 500 in use)


def test_a_device_other_than_the_cpu_and_cuda_gets_its_windows_there(net, monkeypatch):
    """A device without CUDA's streams (Apple's mps) ran its model on the windows as they came
    from numpy, on the CPU, beside its weights on the device: every pass failed. The windows
    go to the predictor's device ("meta" stands in for one here, without autocast, which
    knows no meta; the pass stops at the model)."""
    predictor = Predictor(net, InferenceConfig(device="cpu"))
    predictor.device = torch.device("meta")
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    seen = []

    class Stop(Exception):
        pass

    def hook(module, args):
        seen.append(args[0].device)
        raise Stop

    predictor.model.register_forward_pre_hook(hook)
    n = net.geometry.input_size(16)
    with pytest.raises(Stop):
        predictor.forward(np.zeros((1, n, n, 3), np.float32))
    assert seen == [torch.device("meta")]


def test_joined_futures_of_no_parts_are_refused():
    """No part would ever set the joined future: its waiter would wait forever."""
    from segpipe.execution.futures import concatenated

    with pytest.raises(ValueError, match="at least one part"):
        concatenated([])


def test_a_modules_probe_is_kept_across_predictors_until_its_layers_change(net, monkeypatch):
    """Later runs in this process (an archive's images, one loaded module) reuse the probe of
    their module, device and channels; a layer changed in place is probed again, and another
    module is probed apart."""
    import segpipe.execution.predictor as predictor_module

    probed = []
    probe = predictor_module.activation_bytes_per_pixel

    def counted(model, device, channels):
        probed.append((id(model), channels))
        return probe(model, device, channels)

    monkeypatch.setattr(predictor_module, "activation_bytes_per_pixel", counted)
    config = InferenceConfig(device="cpu")
    first = Predictor(net, config).bytes_per_pixel(3)
    assert Predictor(net, config).bytes_per_pixel(3) == first and len(probed) == 1
    net.head.conv = torch.nn.Conv2d(4, 40, kernel_size=1)  # 40 score maps: more bytes
    assert Predictor(net, config).bytes_per_pixel(3) > first and len(probed) == 2
    torch.manual_seed(0)
    other = models.build("unet", class_names=("a", "b", "c"), width=4, depth=2).eval()
    assert Predictor(other, config).bytes_per_pixel(3) == first
    assert probed == [(id(net), 3), (id(net), 3), (id(other), 3)]
