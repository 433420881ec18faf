"""Tests for segpipe.models: the U-Net, its geometry, the registry, tile-statistics checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from segpipe import models
from segpipe.geometry.tiling import Geometry
from segpipe.models.base import geometry_of, uses_tile_statistics
from segpipe.models.unet import UNet, UNetConfig, UpBlock
from segpipe.synthetic import aerial_scene, tissue_slide

DEPTHS = [1, 2, 3, 4]
PADDINGS = ["valid", "same"]


def small_unet(depth: int, padding: str, width: int = 2, **kw: object) -> UNet:
    torch.manual_seed(0)
    config = UNetConfig(in_channels=1, num_classes=2, width=width, depth=depth, padding=padding)
    return UNet(config, **kw).eval()  # type: ignore[arg-type]


def simulated_output_side(n: int, depth: int, padding: str) -> int | None:
    """Output side of a U-Net for input side ``n`` by walking its layers in plain Python,
    independently of Geometry; None where some layer cannot take the size exactly (a pool of
    an odd side, which max pooling would silently floor, or a side that drops below 1)."""
    shrink = 4 if padding == "valid" else 0  # two 3x3 convs
    for _ in range(depth):
        n -= shrink
        if n < 1 or n % 2:
            return None
        n //= 2
    n -= shrink  # bottleneck
    for _ in range(depth):
        if n < 1:
            return None
        n = 2 * n - shrink
    return n if n >= 1 else None


# -- the paper's network ---------------------------------------------------------------------


def test_paper_geometry() -> None:
    g = UNet(UNetConfig(width=64, depth=4)).geometry
    assert g == Geometry(halo=92, multiple=16, input_offset=12, shrinks=True)
    assert g.output_size(572) == 388
    assert g.input_size(388) == 572


@pytest.mark.parametrize("width", [8, pytest.param(64, marks=pytest.mark.slow)])
def test_paper_572_gives_388(width: int) -> None:
    # width 64 is the paper's network (about 3 s on 2 CPU cores); width 8 checks the same shapes.
    net = models.build("unet", width=width, depth=4).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 572, 572))
    assert out.shape == (1, 2, 388, 388)
    expected_channels = [width * 2**level for level in range(5)]
    assert [b.convs[2].out_channels for b in net.down] == expected_channels[:4]
    assert net.bottleneck.convs[2].out_channels == expected_channels[4]
    assert net.head.conv.in_channels == width


# -- geometry against real shapes ------------------------------------------------------------


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_geometry_size_rule_matches_layer_arithmetic(depth: int, padding: str) -> None:
    g = small_unet(depth, padding).geometry
    assert g.multiple == 2**depth
    for n in range(1, 2 * g.halo + 8 * g.multiple):
        simulated = simulated_output_side(n, depth, padding)
        if padding == "valid":
            assert g.accepts(n) == (simulated is not None), n
            if simulated is not None:
                assert g.output_size(n) == simulated
        elif g.accepts(n):
            assert simulated == n == g.output_size(n)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_geometry_matches_forward_shapes(depth: int, padding: str) -> None:
    net = small_unet(depth, padding)
    g = net.geometry
    sides = [g.input_size(1) + k * g.multiple for k in range(3)]
    with torch.no_grad():
        for h, w in [(sides[0], sides[0]), (sides[1], sides[2])]:
            out = net(torch.rand(1, 1, h, w))
            assert out.shape == (1, 2, g.output_size(h), g.output_size(w))
            if padding == "same":
                assert out.shape[2:] == (h, w)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forward_rejects_sizes_off_the_lattice(depth: int, padding: str) -> None:
    net = small_unet(depth, padding)
    g = net.geometry
    good = g.input_size(1)
    with torch.no_grad():
        for bad in (good + 1, good - 1):
            with pytest.raises(ValueError, match=rf"n % {g.multiple} == {g.input_offset}") as err:
                net(torch.rand(1, 1, good, bad))
            assert f"width {bad}" in str(err.value)
            assert str(good) in str(err.value)  # the nearest accepted size is suggested


def test_forward_rejects_valid_input_too_small_for_any_output() -> None:
    net = small_unet(2, "valid")
    too_small = net.geometry.input_size(1) - net.geometry.multiple
    with pytest.raises(ValueError, match="n > 40"):
        net(torch.rand(1, 1, too_small, too_small))


def test_same_padding_takes_crops_smaller_than_halo() -> None:
    net = small_unet(3, "same")
    with torch.no_grad():
        assert net(torch.rand(2, 1, 16, 24)).shape == (2, 2, 16, 24)


def test_forward_rejects_wrong_channels_and_dtype() -> None:
    net = small_unet(1, "same")
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        net(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="float"):
        net(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_class_names_of_a_module_that_says_neither_names_nor_count_is_refused() -> None:
    """A module with the geometry geometry_of asks for but no num_classes failed with a raw
    AttributeError in segment() and evaluate()."""
    assert models.class_names_of(models.build("unet", num_classes=3, width=4, depth=1)) == (
        "class_0", "class_1", "class_2")  # fmt: skip
    plain = nn.Conv2d(3, 2, 1)
    plain.num_classes = 2
    assert models.class_names_of(plain) == ("class_0", "class_1")
    with pytest.raises(TypeError, match=r"Conv2d says no class_names and a num_classes of None"):
        models.class_names_of(nn.Conv2d(3, 2, 1))
    for count, shown in ((2.9, "2.9"), (True, "True"), ("3", "'3'"), (0, "0")):
        plain.num_classes = count  # 2.9 made 2 classes, True 1, "3" 3
        with pytest.raises(TypeError, match=rf"a num_classes of {shown}: give"):
            models.class_names_of(plain)
    plain.num_classes = np.int64(2)
    assert models.class_names_of(plain) == ("class_0", "class_1")


def test_up_block_joins_the_centre_cropped_skip_before_the_upsampled_map() -> None:
    """The paper's crop-and-copy, against a crop by hand: the skip's centre (the floor of the
    odd difference, 5 // 2 rows and 7 // 2 columns), its channels first (the order the
    shipped weights were trained with)."""
    torch.manual_seed(0)
    block = UpBlock(4, 3, "valid").eval()
    x, skip = torch.rand(1, 4, 5, 6), torch.rand(1, 3, 15, 19)
    with torch.no_grad():
        up = block.up(x)
        assert up.shape[2:] == (10, 12)
        want = block.convs(torch.cat([skip[:, :, 2:12, 3:15], up], dim=1))
        torch.testing.assert_close(block(x, skip), want)


# -- exactness: tiles agree ------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    depth=st.integers(1, 4),
    shift_y=st.integers(0, 2),
    shift_x=st.integers(0, 2),
    extra=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_valid_unet_windows_agree_on_overlap(
    depth: int, shift_y: int, shift_x: int, extra: int, seed: int
) -> None:
    net = small_unet(depth, "valid", width=4)
    g = net.geometry
    n_small = g.input_size(8)
    n_large = n_small + (max(shift_y, shift_x) + extra) * g.multiple
    image = torch.rand(1, 1, n_large, n_large, generator=torch.Generator().manual_seed(seed))
    oy, ox = shift_y * g.multiple, shift_x * g.multiple
    with torch.no_grad():
        large = net(image)
        small = net(image[:, :, oy : oy + n_small, ox : ox + n_small])
    # Output pixel (i, j) of a window at (oy, ox) sits at input pixel (oy + halo + i, ...).
    overlap = large[:, :, oy : oy + small.shape[2], ox : ox + small.shape[3]]
    # float32 convolutions over different input sizes sum in different orders: ~1e-6 relative
    # to the activations they sum, so the tolerance follows the logits' scale
    scale = max(1.0, float(large.abs().max()))
    torch.testing.assert_close(small, overlap, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("depth", [1, 2])
def test_same_unet_windows_agree_beyond_halo(depth: int) -> None:
    net = small_unet(depth, "same", width=4)
    g = net.geometry
    m, h = g.multiple, g.halo
    base = g.input_size(1)  # smallest lattice side > 2 * halo
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 1, base + 4 * m, base + 5 * m, generator=gen)
    oy, ox = m, 2 * m  # window origins on the lattice, as the tiler places them
    win = image[:, :, oy : oy + base + 2 * m, ox : ox + base + 3 * m]
    with torch.no_grad():
        whole, part = net(image), net(win)

    def inner(crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = part[:, :, crop:-crop, crop:-crop]
        want = whole[
            :, :, oy + crop : oy + win.shape[2] - crop, ox + crop : ox + win.shape[3] - crop
        ]
        return got, want

    torch.testing.assert_close(*inner(h), rtol=0, atol=1e-5)
    # ...while a crop well inside the halo shows the window's zero padding.
    assert not torch.allclose(*inner(m), rtol=0, atol=1e-3)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_same_halo_is_the_receptive_field_margin(depth: int) -> None:
    """Independent of the formula: autograd finds which input pixels each output pixel of a
    row depends on. Max pooling is swapped for average pooling (same support, but gradient
    to every pixel of the window) and weights are made positive so nothing cancels."""
    net = small_unet(depth, "same", width=1).double()
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.uniform_(module.weight, 0.1, 1.0)
            nn.init.constant_(module.bias, 0.1)
    for block in net.down:
        block.pool = nn.AvgPool2d(2)
    m = 2**depth
    side = 16 * m
    x = torch.rand(1, 1, 4 * m, side, dtype=torch.float64, requires_grad=True)
    y = net(x)
    margin = 0
    for j in range(side // 2 - m, side // 2 + m):  # every phase, far from the borders
        (grad,) = torch.autograd.grad(y[0, 0, 2 * m, j], x, retain_graph=True)
        cols = np.flatnonzero(grad[0, 0].abs().sum(0).numpy())
        margin = max(margin, j - cols.min(), cols.max() - j)
    assert margin == net.geometry.halo


# -- dropout, normalisation, registry --------------------------------------------------------


def test_dropout_only_in_training() -> None:
    net = small_unet(2, "same", width=4)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
        no_dropout = UNet(UNetConfig(in_channels=1, width=4, depth=2, padding="same", dropout=0))
        no_dropout.load_state_dict(net.state_dict())
        torch.testing.assert_close(net(x), no_dropout.eval()(x), rtol=0, atol=0)
        net.train()
        torch.manual_seed(3)
        a = net(x)
        assert not torch.equal(a, net(x))


def test_model_applies_its_own_normalisation() -> None:
    a = models.build("unet", width=2, depth=1, padding="same")
    b = models.build(
        "unet", width=2, depth=1, padding="same", input_mean=[0.1, 0.2, 0.3], input_std=0.5
    )
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 8, 8)
    mean_b = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    x_b = (x - 0.5) / 0.25 * 0.5 + mean_b  # the same normalised input for b
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x_b), rtol=1e-5, atol=1e-5)
    assert "input_mean_buffer" not in a.state_dict()  # normalisation lives beside the weights


def test_build_defaults_and_class_names() -> None:
    net = models.build("unet", width=2, depth=1)
    assert net.name == "unet"
    assert net.in_channels == 3
    assert net.num_classes == 2
    assert net.class_names == ("class_0", "class_1")
    assert net.input_mean == (0.5,) * 3
    assert net.input_std == (0.25,) * 3
    named = models.build("unet", class_names=["bg", "tumour", "stroma"], width=2, depth=1)
    assert named.num_classes == 3
    assert named.config.num_classes == 3
    assert named.class_names == ("bg", "tumour", "stroma")
    assert models.available() == sorted(models.available())
    assert "unet" in models.available()


def test_build_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*'unet'"):
        models.build("resnet")
    with pytest.raises(ValueError, match="num_classes=2 but 3 class names"):
        models.build("unet", class_names=["a", "b", "c"], num_classes=2)
    with pytest.raises(ValueError, match="UNetConfig takes"):
        models.build("unet", widht=8)
    with pytest.raises(ValueError, match="padding"):
        models.build("unet", padding="reflect")
    with pytest.raises(ValueError, match="input_mean needs 3 values"):
        models.build("unet", input_mean=[0.5, 0.5])


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        ({"input_mean": float("nan")}, r"input_mean \(nan, nan, nan\) holds NaN or infinite"),
        ({"input_std": [0.25, float("inf"), 0.25]}, r"input_std \(0\.25, inf, 0\.25\) holds NaN"),
        ({"input_mean": "0.5"}, r"input_mean '0\.5' is text"),
    ],
    ids=str,
)
@pytest.mark.parametrize("how", ["build", "wrap"])
def test_non_finite_input_statistics_are_refused(
    how: str, given: dict[str, Any], refusal: str
) -> None:
    """NaN made every probability NaN (inf: every input the mean); a checkpoint holding
    them was refused by load, but build(), wrap() and sidecars took them. A string was read
    as its characters ("could not convert string to float: '.'")."""

    def make() -> nn.Module:
        if how == "build":
            return models.build("fcn", width=2, layers=1, **given)
        settings: dict[str, Any] = {"halo": 0, "multiple": 1, **given}
        return models.wrap(nn.Conv2d(3, 2, 1), class_names=["a", "b"], **settings)

    with pytest.raises(ValueError, match=refusal):
        make()


def test_a_model_whose_init_needs_real_values_still_builds(monkeypatch):
    """Counting on the meta device failed build() for an __init__ calling .item() (a filter
    bank computed from data): such a model is built as before, uncounted."""
    from torch import nn

    from segpipe.geometry.tiling import Geometry
    from segpipe.models.base import REGISTRY, SegmentationModel
    from segpipe.models.fcn import FCNConfig

    class Scaled(SegmentationModel):
        name = "scaled-test"
        config_class = FCNConfig

        def __init__(self, config=None, **kw):
            super().__init__(config, **kw)
            self.conv = nn.Conv2d(self.config.in_channels, self.config.num_classes, 3, padding=1)
            self.scale = float(torch.linspace(-2, 2, 5).abs().max())  # real values

        @property
        def geometry(self):
            return Geometry(halo=1, multiple=1, input_offset=0, shrinks=False)

        def forward(self, x):
            return self.conv(x) * self.scale

    monkeypatch.setitem(REGISTRY, "scaled-test", Scaled)
    net = models.build("scaled-test", class_names=("a", "b"))
    assert net.scale == 2.0 and net.conv.weight.device.type == "cpu"


@pytest.mark.parametrize(("name", "config"), [("unet", {"depth": 12}), ("fcn", {"width": 10**5})])
def test_a_network_of_a_billion_weights_is_refused_before_it_is_allocated(name, config):
    """--depth 12 allocated 4.5 GB of one layer's weights and died in the allocator (a
    traceback, or the OOM killer with no word): the size is counted on the meta device."""
    with pytest.raises(ValueError, match=rf"build\('{name}'\): .* has [\d,]+ parameters"):
        models.build(name, **config)


def test_load_unknown_name_lists_what_exists() -> None:
    with pytest.raises(
        ValueError, match=r"Shipped models: .*architectures for build\(\): \[.*'unet'"
    ):
        models.load("no-such-model")
    with pytest.raises(ValueError, match="is an architecture, not a trained model"):
        models.load("unet")


# -- geometry_of and uses_tile_statistics ----------------------------------------------------


def test_geometry_of() -> None:
    net = small_unet(2, "valid")
    assert geometry_of(net) == net.geometry
    conv = nn.Conv2d(1, 1, 3)
    with pytest.raises(
        TypeError, match=r"Conv2d .*`geometry` attribute.*segpipe\.geometry\.tiling\.Geometry"
    ):
        geometry_of(conv)
    conv.geometry = Geometry(halo=1, shrinks=True)  # type: ignore[assignment]
    assert geometry_of(conv).halo == 1


def _norms(*more: nn.Module) -> nn.Sequential:
    """A conv and one normalisation layer of each kind, then ``more``: flagged in training
    mode "1".."5", in eval mode all but the tracked BatchNorm "3"."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)),
        nn.LayerNorm([4, 8, 8]),
        *more,
    )


def test_uses_tile_statistics() -> None:
    net = _norms(nn.LayerNorm(4))  # channels-last per-pixel norm: not flagged
    assert uses_tile_statistics(net.train()) == ["1", "2", "3", "4.0", "5"]
    # Eval-mode BatchNorm uses its running statistics: the same for every tile.
    assert uses_tile_statistics(net.eval()) == ["1", "2", "4.0", "5"]
    tracked = nn.InstanceNorm2d(4, track_running_stats=True)
    assert uses_tile_statistics(tracked.eval()) == []
    assert uses_tile_statistics(small_unet(4, "valid").train()) == []


@pytest.mark.parametrize(
    ("kind", "training"),
    # an exported program's mode is fixed at export, and segpipe runs models in eval mode
    [
        ("traced", True),
        ("traced", False),
        ("scripted", True),
        ("scripted", False),
        ("exported", False),
    ],
)
def test_uses_tile_statistics_of_torchscript_and_exported_modules(
    kind: str, training: bool
) -> None:
    """The same layers flagged as in the eager module they were made from (a traced module's
    mode is the one it was traced in), so exact mode refuses them too."""
    torch.manual_seed(0)
    net = _norms(
        nn.LayerNorm(8),  # over the last axis only: not flagged
        nn.InstanceNorm2d(4, track_running_stats=True),
    ).train(training)
    x = torch.rand(2, 1, 10, 10)
    converted = {
        "traced": lambda: torch.jit.trace(net, x),
        "scripted": lambda: torch.jit.script(net),
        "exported": lambda: torch.export.export(net, (x,)).module(),
    }[kind]()
    expected = uses_tile_statistics(net)
    assert expected == (["1", "2", "3", "4.0", "5", "7"] if training else ["1", "2", "4.0", "5"])
    assert uses_tile_statistics(converted) == expected
    wrapped = models.wrap(converted, class_names=list("abcd"), in_channels=1, halo=1, multiple=1)
    # in eval mode now, as wrap() leaves it: a scripted BatchNorm then uses running statistics
    assert uses_tile_statistics(wrapped) == [f"module.{n}" for n in uses_tile_statistics(converted)]


# -- the shipped models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "scene", "side", "seed"),
    [("tissue-unet", tissue_slide, 172, 2), ("aerial-unet", aerial_scene, 172, 0)],
    ids=["tissue-unet", "aerial-unet"],
)
def test_shipped_models_segment_a_synthetic_scene(
    name: str, scene: Any, side: int, seed: int
) -> None:
    """The shipped weights with the forward pass they were trained with: one window, no
    tiler, scored by hand against the scene's truth under the output (the halo off every
    side). Guards the architecture's wiring, which random weights cannot: a skip cropped
    off centre or concatenated in the other order still runs, at a Dice near 0.5 or 0.2."""
    net = models.load(name)
    slide = scene(side, seed=seed)
    x = torch.from_numpy(slide.image.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    with torch.no_grad():
        predicted = net(x).argmax(1)[0].numpy()
    h = net.geometry.halo
    truth = slide.labels[h:-h, h:-h]
    assert predicted.shape == truth.shape
    present = np.unique(truth)
    assert len(present) >= 3  # a scene that tells the classes apart
    for k in present:
        p, t = predicted == k, truth == k
        dice = 2 * (p & t).sum() / (p.sum() + t.sum())
        assert dice > 0.9, (name, net.class_names[k], dice)
