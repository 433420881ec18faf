"""The rest of the notes' model family: sliding-window classifier, FCN, down-then-up FCN.

First the notes' operations against hand-written numpy, then every model (and a spread of
pooling/upsampling kinds) through the same checks: geometry against autograd and real
shapes, overfitting one batch, segment() against a whole-image pass, checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

import segpipe
from segpipe import models
from segpipe.cli import main
from segpipe.geometry.tiling import Geometry, mirror_indices
from segpipe.models.base import uses_tile_statistics
from segpipe.models.fcn_updown import POOLS, UPSAMPLES, pooling, upsampling
from segpipe.models.layers import MinPool2d, SumPool2d, Unpool2d, UpConv2d
from segpipe.models.sliding_window import SlidingWindow
from segpipe.synthetic import tissue_slide

CLASSES = ("background", "tissue", "nucleus")

# (name, config): every architecture, and the pooling and upsampling kinds of fcn-updown.
CASES = [
    pytest.param("sliding-window", {"patch": 9, "width": 4, "hidden": 16}, id="sliding-window"),
    pytest.param("fcn", {"width": 8, "layers": 4}, id="fcn"),
    pytest.param(
        "fcn-updown", {"width": 8, "pool": "max", "upsample": "maxunpool"}, id="max-maxunpool"
    ),
    pytest.param("fcn-updown", {"width": 8, "pool": "avg", "upsample": "unpool"}, id="avg-unpool"),
    pytest.param(
        "fcn-updown",
        {"width": 8, "pool": "sum", "upsample": "transpose", "transpose_kernel": 3},
        id="sum-transpose3",
    ),
    pytest.param(
        "fcn-updown", {"width": 8, "pool": "min", "upsample": "transpose"}, id="min-transpose2"
    ),
]


def build(name: str, config: dict, seed: int = 0) -> models.SegmentationModel:
    torch.manual_seed(seed)
    return models.build(name, class_names=CLASSES, **config).eval()


def blocks(x: np.ndarray) -> np.ndarray:
    """``(H, W)`` -> ``(H/2, W/2, 4)``: the four pixels of every 2x2 block, row-major."""
    h, w = x.shape
    return x.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(h // 2, w // 2, 4)


# -- the notes' operations -------------------------------------------------------------------


def transposed_conv_by_hand(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """The notes' definition: each input value scales the kernel, which is added into the
    output at ``stride`` times the value's position; overlaps sum."""
    k = kernel.shape[0]
    out = np.zeros((stride * (x.shape[0] - 1) + k, stride * (x.shape[1] - 1) + k))
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[stride * i : stride * i + k, stride * j : stride * j + k] += x[i, j] * kernel
    return out


def test_transposed_convolution_notes_example() -> None:
    x = np.array([[2.0, 1.0], [4.0, 3.0]])
    expected = transposed_conv_by_hand(x, np.ones((3, 3)), stride=2)
    assert expected.shape == (5, 5)
    np.testing.assert_array_equal(
        expected,
        [
            [2, 2, 3, 1, 1],
            [2, 2, 3, 1, 1],
            [6, 6, 10, 4, 4],
            [4, 4, 7, 3, 3],
            [4, 4, 7, 3, 3],
        ],
    )
    t = torch.tensor(x, dtype=torch.float32)[None, None]
    conv = nn.ConvTranspose2d(1, 1, 3, stride=2, bias=False)
    up = UpConv2d(1, 1, kernel_size=3)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        up.conv.weight.fill_(1.0)
        up.conv.bias.zero_()
        np.testing.assert_array_equal(conv(t)[0, 0].numpy(), expected)
        # Cropped to 4x4: the notes do not say which side; UpConv2d keeps the top-left.
        np.testing.assert_array_equal(up(t)[0, 0].numpy(), expected[:4, :4])


def test_transposed_convolution_kernel_2_tiles_without_overlap() -> None:
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(3, 4)), rng.normal(size=(2, 2))
    up = UpConv2d(1, 1, kernel_size=2).double()
    with torch.no_grad():
        up.conv.weight.copy_(torch.from_numpy(kernel)[None, None])
        up.conv.bias.zero_()
        got = up(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, transposed_conv_by_hand(x, kernel, 2), atol=1e-12)
    np.testing.assert_allclose(got, np.kron(x, np.ones((2, 2))) * np.tile(kernel, (3, 4)))


def _inputs_per_output(m: nn.Module) -> float:
    """N of the U-Net paper's init, counted: the (channel, pixel) inputs that reach one output
    pixel, on average over an interior that holds whole periods of the stride."""
    ones = torch.ones(1, m.in_channels, 12, 12)
    if isinstance(m, nn.ConvTranspose2d):
        w = torch.ones(m.in_channels, 1, *m.kernel_size)
        count = F.conv_transpose2d(ones, w, stride=m.stride)
    else:
        count = F.conv2d(ones, torch.ones(1, m.in_channels, *m.kernel_size), stride=m.stride)
    return count[0, 0, 4:8, 4:8].mean().item()


@pytest.mark.parametrize(
    "kind",
    [
        {"name": "unet", "width": 16, "depth": 3},
        {"name": "fcn-updown", "width": 32, "upsample": "transpose", "transpose_kernel": 2},
        {"name": "fcn-updown", "width": 32, "upsample": "transpose", "transpose_kernel": 3},
    ],
    ids=["unet", "updown-k2", "updown-k3"],
)
def test_every_conv_starts_with_the_papers_he_init(kind: dict) -> None:
    """std sqrt(2 / N), N the inputs of one output unit counted by convolving ones: torch's
    fan-in gave the 2x2 stride-2 up-convolutions half (U-Net) and a quarter (fcn-updown) of
    that variance."""
    torch.manual_seed(0)
    net = models.build(kind.pop("name"), class_names=("a", "b", "c"), **kind)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert any(isinstance(m, nn.ConvTranspose2d) for m in convs)
    for m in convs:
        assert not m.bias.any()
        if m.weight.numel() >= 1000:  # a sample's std within a few % (the 1x1 head: 48)
            expected = math.sqrt(2 / _inputs_per_output(m))
            assert m.weight.std().item() == pytest.approx(expected, rel=0.1), m


def test_max_unpooling_puts_values_back_at_argmax() -> None:
    x = torch.randperm(6 * 8, generator=torch.Generator().manual_seed(0)).float().view(1, 1, 6, 8)
    pool = pooling("max", return_indices=True)
    pooled, indices = pool(x)
    out = upsampling("maxunpool", 1, 2)(pooled, indices)[0, 0].numpy()
    b = blocks(x[0, 0].numpy())
    expected = np.zeros_like(b)
    top = b.argmax(axis=2)
    np.put_along_axis(expected, top[..., None], b.max(axis=2)[..., None], axis=2)
    np.testing.assert_array_equal(blocks(out), expected)
    assert np.count_nonzero(out) == 3 * 4


def test_sum_pooling_is_four_times_average() -> None:
    x = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(1))
    got = SumPool2d()(x)
    torch.testing.assert_close(got, 4 * F.avg_pool2d(x, 2), rtol=1e-6, atol=1e-6)
    expected = blocks(x[1, 2].numpy()).sum(axis=2)
    np.testing.assert_allclose(got[1, 2].numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(pooling("sum")(x), got)


def test_min_pooling_takes_minima() -> None:
    x = torch.randn(1, 2, 8, 6, generator=torch.Generator().manual_seed(2))
    got = MinPool2d()(x)
    for c in range(2):
        np.testing.assert_array_equal(got[0, c].numpy(), blocks(x[0, c].numpy()).min(axis=2))
    torch.testing.assert_close(pooling("min")(x), got)


def test_unpooling_repeats_each_value_over_its_block() -> None:
    x = torch.randn(1, 1, 3, 5, generator=torch.Generator().manual_seed(3))
    got = Unpool2d()(x)[0, 0].numpy()
    np.testing.assert_array_equal(got, np.kron(x[0, 0].numpy(), np.ones((2, 2), np.float32)))


# -- construction and geometry ---------------------------------------------------------------


@pytest.mark.parametrize("upsample", UPSAMPLES)
@pytest.mark.parametrize("pool", POOLS)
def test_every_sensible_combination_builds(pool: str, upsample: str) -> None:
    config = {"width": 2, "levels": 2, "pool": pool, "upsample": upsample}
    if upsample == "maxunpool" and pool != "max":
        with pytest.raises(ValueError, match=rf"maxunpool.*pool='{pool}'.*pool=\"max\""):
            models.build("fcn-updown", **config)
        return
    net = build("fcn-updown", config)
    with torch.no_grad():
        assert net(torch.rand(2, 3, 12, 16)).shape == (2, 3, 12, 16)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"patch must be odd.*use 33"):
        models.build("sliding-window", patch=32)
    with pytest.raises(ValueError, match="too small for 3 2x2 poolings"):
        models.build("sliding-window", patch=7, stages=3)
    with pytest.raises(ValueError, match=r"pool must be one of .*'median'"):
        models.build("fcn-updown", pool="median")
    with pytest.raises(ValueError, match=r"upsample must be one of .*'bilinear'"):
        models.build("fcn-updown", upsample="bilinear")
    with pytest.raises(ValueError, match="transpose_kernel must be 2 or 3, got 4"):
        models.build("fcn-updown", transpose_kernel=4)
    with pytest.raises(ValueError, match="layers must be an integer >= 1, got 0"):
        models.build("fcn", layers=0)


@pytest.mark.parametrize(
    ("name", "config", "expected"),
    [
        ("sliding-window", {}, Geometry(halo=16, multiple=1, shrinks=True)),
        ("sliding-window", {"patch": 9}, Geometry(halo=4, multiple=1, shrinks=True)),
        ("fcn", {}, Geometry(halo=6)),
        ("fcn", {"layers": 3}, Geometry(halo=3)),
        ("fcn-updown", {}, Geometry(halo=23, multiple=4)),
        ("fcn-updown", {"levels": 3, "upsample": "unpool"}, Geometry(halo=51, multiple=8)),
        ("fcn-updown", {"transpose_kernel": 3}, Geometry(halo=26, multiple=4)),
        ("fcn-updown", {"levels": 4, "transpose_kernel": 3}, Geometry(halo=122, multiple=16)),
    ],
)
def test_geometry(name: str, config: dict, expected: Geometry) -> None:
    assert models.build(name, width=2, **config).geometry == expected


@pytest.mark.parametrize(("name", "config"), CASES)
def test_output_shape_matches_geometry(name: str, config: dict) -> None:
    net = build(name, config)
    g = net.geometry
    assert uses_tile_statistics(net.train()) == []  # exact mode accepts it
    net.eval()
    tile = 2 * g.multiple
    h, w = g.input_size(tile), g.input_size(tile + g.multiple)
    with torch.no_grad():
        out = net(torch.rand(1, 3, h, w))
    assert out.shape == (1, 3, g.output_size(h), g.output_size(w))
    # The tiler's crop: `crop` pixels off the top-left, then the tile.
    cropped = out[:, :, g.crop : g.crop + tile, g.crop : g.crop + tile + g.multiple]
    assert cropped.shape == (1, 3, tile, tile + g.multiple)


def receptive_field_margin(net: nn.Module, rows: int, cols: int, m: int) -> int:
    """The farthest an input pixel is from an output pixel that depends on it, found with
    autograd for every phase of output column near the middle of a ``rows x cols`` input."""
    for module in net.modules():
        # Positive weights so nothing cancels; ReLUs then pass every gradient.
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.uniform_(module.weight, 0.1, 1.0)
            nn.init.constant_(module.bias, 0.1)
    # Inputs in [0.5, 1]: non-negative after the model's (x - 0.5) / 0.25.
    x = 0.5 + 0.5 * torch.rand(1, net.in_channels, rows, cols, dtype=torch.float64)
    x.requires_grad_(True)
    y = net.double()(x)
    margin = 0
    for j in range(cols // 2 - m, cols // 2 + m):
        (grad,) = torch.autograd.grad(y[0, 0, rows // 2, j], x, retain_graph=True)
        touched = np.flatnonzero(grad[0].abs().sum((0, 1)).numpy())
        margin = max(margin, j - touched.min(), touched.max() - j)
    return int(margin)


@pytest.mark.parametrize("layers", [1, 4])
def test_fcn_halo_is_the_receptive_field_margin(layers: int) -> None:
    net = models.build("fcn", in_channels=1, width=1, layers=layers)
    assert receptive_field_margin(net, 16, 32, 1) == net.geometry.halo == layers


@pytest.mark.parametrize(
    ("upsample", "kernel"), [("unpool", 2), ("transpose", 2), ("transpose", 3)]
)
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_fcn_updown_halo_is_the_receptive_field_margin(
    levels: int, upsample: str, kernel: int
) -> None:
    """Max pooling is swapped for average pooling: the same 2x2 support, but a gradient to
    every pixel of it. (Max unpooling's dependence on its indices has no gradient; its
    exactness is shown by the segment() test below.)"""
    net = models.build(
        "fcn-updown",
        in_channels=1,
        width=1,
        levels=levels,
        upsample=upsample,
        transpose_kernel=kernel,
    )
    for block in net.down:
        block.pool = nn.AvgPool2d(2)
    m = 2**levels
    assert receptive_field_margin(net, 4 * m, 24 * m, m) == net.geometry.halo


def test_sliding_window_is_the_patch_classifier_on_every_patch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = build("sliding-window", {"patch": 7, "width": 2, "stages": 1, "hidden": 8})
    p = 7
    x = torch.rand(2, 3, 13, 16, generator=torch.Generator().manual_seed(4))
    xn = (x - net.input_mean_buffer) / net.input_std_buffer
    with torch.no_grad():
        expected = torch.zeros(2, 3, 13 - p + 1, 16 - p + 1)
        for i in range(expected.shape[2]):
            for j in range(expected.shape[3]):
                expected[:, :, i, j] = net.classifier(xn[:, :, i : i + p, j : j + p])
        batches: list[int] = []
        net.classifier.register_forward_hook(lambda _m, args, _o: batches.append(len(args[0])))
        # Chunks of one row and of several rows (10 columns of output).
        for chunk in (5, 25, 4096):
            monkeypatch.setattr(SlidingWindow, "patches_per_chunk", chunk)
            batches.clear()
            torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
            # Honest about the work: one classifier run per output pixel, none shared.
            assert sum(batches) == 2 * 7 * 10
            assert max(batches) <= max(chunk, 10)


# -- training: every model overfits one batch ------------------------------------------------


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A 48 x 48 crop of a synthetic slide with all three classes (155 nucleus pixels)."""
    slide = tissue_slide((64, 64), seed=0)
    crop = np.s_[8:56, 16:64]
    x = torch.from_numpy(slide.image[crop].copy()).permute(2, 0, 1)[None].float() / 255
    return x, torch.from_numpy(slide.labels[crop].astype(np.int64))[None]


@pytest.mark.parametrize(("name", "config"), CASES)
def test_overfits_one_batch(name: str, config: dict, batch: tuple) -> None:
    """The loss (mean over pixels) falls by 90 % within 400 Adam steps, measured from the
    initial loss or from chance (ln C, uniform probabilities), whichever is lower: sum
    pooling's 4x per level can start a random network far above chance, and falling from
    there proves little. 50-300 steps for three seeds and eight
    configurations when this was written."""
    torch.set_num_threads(1)
    x, labels = batch
    net = build(name, config).train()
    g = net.geometry
    if g.shrinks:  # a valid model labels only the pixels whose context is inside the input
        labels = labels[:, g.halo : -g.halo, g.halo : -g.halo]
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = [F.cross_entropy(net(x), labels)]
    target = 0.1 * min(losses[0].item(), math.log(len(CLASSES)))
    while losses[-1].item() > target and len(losses) <= 400:
        optimiser.zero_grad()
        losses[-1].backward()
        optimiser.step()
        losses.append(F.cross_entropy(net(x), labels))
    assert losses[-1].item() <= target, (losses[0].item(), losses[-1].item(), len(losses))


# -- the pipeline: segment() against a whole-image pass, checkpoints -------------------------


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:52]
    base = 127 + 80 * np.sin(yy / 5.0)[..., None] * np.cos(xx / 7.0)[..., None]
    return np.clip(base + rng.normal(0, 30, (40, 52, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(image: np.ndarray, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("src") / "image.zarr"
    arr = zarr.create_array(
        path, shape=image.shape, chunks=(32, 32, 3), dtype=image.dtype, dimension_names="yxc"
    )
    arr[...] = image
    return path


def whole_image_probabilities(net: models.SegmentationModel, image: np.ndarray) -> np.ndarray:
    """One forward pass over the image mirrored by the halo (and to the size rule), cropped
    back: what exact mode must reproduce tile by tile."""
    g, (h, w) = net.geometry, image.shape[:2]
    ny, nx = g.input_size(h), g.input_size(w)
    iy, ix = mirror_indices(-g.halo, ny - g.halo, h), mirror_indices(-g.halo, nx - g.halo, w)
    x = image[np.ix_(iy, ix)].astype(np.float32) / 255
    with torch.inference_mode():
        p = torch.softmax(net(torch.from_numpy(x).permute(2, 0, 1)[None]), 1)[0].numpy()
    c = g.crop if g.shrinks else g.halo
    return p[:, c : c + h, c : c + w]


@pytest.mark.parametrize(("name", "config"), CASES)
def test_exact_segment_equals_whole_image_pass(name, config, source, image, tmp_path) -> None:
    net = build(name, config)
    out = segpipe.segment(
        source,
        tmp_path / "r.zarr",
        net,
        tile=16,
        task_tiles=2,
        batch_size=2,
        scheduler="sync",
        probability_dtype="float32",
    )
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...]
    expected = whole_image_probabilities(net, image)
    assert got.shape == expected.shape == (3, 40, 52)
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize(("name", "config"), CASES)
def test_checkpoint_round_trip_and_cli(name, config, source, image, tmp_path, capsys) -> None:
    net = build(name, config, seed=5)
    path = models.save(net, tmp_path / f"{name}.pt")
    loaded = models.load(path)
    assert type(loaded) is type(net)
    assert loaded.config == net.config
    assert loaded.class_names == CLASSES
    assert models.fingerprint(loaded) == models.fingerprint(net)
    x = torch.rand(1, 3, *(2 * [net.geometry.input_size(8)]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)

    # The CLI path: `segpipe segment --model CHECKPOINT` (probabilities stored as float16).
    out = tmp_path / "cli.zarr"
    args = ["segment", str(source), str(out), "--model", str(path), "--tile", "16"]
    assert main([*args, "--scheduler", "sync"]) == 0
    assert capsys.readouterr().out.strip().endswith("cli.zarr")
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...].astype(np.float32)
    assert np.abs(got - whole_image_probabilities(net, image)).max() <= 1e-3
