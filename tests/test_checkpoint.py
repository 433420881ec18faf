"""Tests for segpipe.models.checkpoint: save/load round trips, refusals, fingerprints."""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segpipe import models
from segpipe.geometry.tiling import Geometry
from segpipe.models import PixelContract
from segpipe.models.base import code_of
from segpipe.models.checkpoint import FORMAT, CheckpointError, fingerprint, load, save
from segpipe.models.unet import UNet


class Payload:
    """A custom class: pickling an instance stores a reference to code."""

    def __init__(self) -> None:
        self.value = 1


@pytest.fixture
def net() -> UNet:
    torch.manual_seed(0)
    model = models.build(
        "unet",
        class_names=["background", "tissue", "marker"],
        input_mean=[0.8, 0.6, 0.7],
        input_std=[0.1, 0.15, 0.12],
        width=4,
        depth=2,
        padding="valid",
    )
    assert isinstance(model, UNet)
    return model.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 3, 60, 60, generator=torch.Generator().manual_seed(0))


def test_round_trip_is_identical(net: UNet, x: torch.Tensor, tmp_path: Path) -> None:
    path = save(net, tmp_path / "sub" / "net.pt", metrics={"dice": np.float32(0.75), "epoch": 3})
    assert path == tmp_path / "sub" / "net.pt"
    loaded = load(path)
    assert type(loaded) is UNet
    assert not loaded.training
    assert loaded.config == net.config
    assert loaded.class_names == net.class_names
    assert loaded.input_mean == net.input_mean
    assert loaded.input_std == net.input_std
    assert loaded.checkpoint_metrics == {"dice": 0.75, "epoch": 3}
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert fingerprint(loaded) == fingerprint(net)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_file_is_a_plain_dict(net: UNet, tmp_path: Path) -> None:
    payload = torch.load(save(net, tmp_path / "net.pt"), weights_only=True)
    assert payload["format"] == FORMAT
    assert payload["name"] == "unet"
    assert payload["config"] == {
        "in_channels": 3,
        "num_classes": 3,
        "width": 4,
        "depth": 2,
        "padding": "valid",
        "dropout": 0.5,
    }
    assert payload["class_names"] == ["background", "tissue", "marker"]
    assert payload["metrics"] == {}
    assert set(payload["state_dict"]) == set(net.state_dict())


def test_public_load_takes_paths_and_shipped_names(
    net: UNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(net, tmp_path / "net.pt")
    assert fingerprint(models.load(path)) == fingerprint(net)
    assert fingerprint(models.load(str(path))) == fingerprint(net)
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    assert models.shipped() == {"net": path}
    assert fingerprint(models.load("net")) == fingerprint(net)


def test_half_precision_file(net: UNet, x: torch.Tensor, tmp_path: Path) -> None:
    full = save(net, tmp_path / "full.pt")
    half = save(net, tmp_path / "half.pt", half=True)
    assert os.path.getsize(half) < 0.7 * os.path.getsize(full)
    loaded = load(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        # float16 keeps ~3 significant digits per weight: errors scale with the logits.
        expected = net(x)
        scale = float(expected.abs().max())
        torch.testing.assert_close(loaded(x), expected, rtol=1e-2, atol=1e-3 * scale)
    assert fingerprint(loaded) != fingerprint(net)  # the weights were rounded


def test_pickled_objects_are_refused(net: UNet, tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "name": "unet", "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refuses to unpickle"):
        load(path)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"noise\.pt is not a segpipe checkpoint"):
        load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent"):
        load(tmp_path / "absent.pt")


def test_other_torch_files_are_refused(net: UNet, tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save(net.state_dict(), path)  # a bare state dict, as many projects ship
    with pytest.raises(CheckpointError, match=r"state\.pt is not a segpipe checkpoint"):
        load(path)


def edited(net: UNet, tmp_path: Path, **changes: object) -> Path:
    path = save(net, tmp_path / "net.pt")
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return path


def test_unknown_model_name(net: UNet, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"net\.pt holds a model named 'vit'.*\[.*'unet'"):
        load(edited(net, tmp_path, name="vit"))


def test_config_mismatch(net: UNet, tmp_path: Path) -> None:
    config = {**torch.load(save(net, tmp_path / "a.pt"), weights_only=True)["config"], "heads": 8}
    with pytest.raises(CheckpointError, match=r"net\.pt: its config .* does not fit"):
        load(edited(net, tmp_path, config=config))
    with pytest.raises(CheckpointError, match=r"net\.pt: its config"):
        load(edited(net, tmp_path, class_names=["only one"]))


@pytest.mark.parametrize("lie", [{"width": 2**29}, {"depth": 40}])
def test_a_config_whose_sizes_overflow_is_refused(net: UNet, tmp_path: Path, lie) -> None:
    """torch refuses such a build with RuntimeError ("Storage size calculation overflowed"),
    which went out bare, naming no file."""
    config = {**torch.load(save(net, tmp_path / "a.pt"), weights_only=True)["config"], **lie}
    with pytest.raises(CheckpointError, match=r"net\.pt: its config .* does not fit"):
        load(edited(net, tmp_path, config=config))


@pytest.mark.parametrize(
    ("layers", "shown"), [(300, "missing 'convs.4.weight'"), (1, "unexpected 'convs.2.bias'")]
)
def test_a_config_that_lies_about_its_depth_is_refused_before_it_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layers: int, shown: str
) -> None:
    """An FCN of 300 same-shaped layers passed the shape check (it compared shared keys only)
    and was built in real memory, 0.7 GB at width 256, before its missing weights were seen."""
    from segpipe.models.fcn import FCN

    path = save(models.build("fcn", width=8, layers=2), tmp_path / "fcn.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["layers"] = layers
    torch.save(payload, path)
    built, real_init = [], FCN.__init__

    def init(self: FCN, *args: Any, **kwargs: Any) -> None:
        built.append(torch.empty(()).device.type)  # the default device it is built on
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(FCN, "__init__", init)
    with pytest.raises(
        CheckpointError, match=r"fcn\.pt: its weights do not match its config"
    ) as err:
        load(path)
    assert shown in str(err.value)
    assert "the file holds 6" in str(err.value)
    assert built == ["meta"]  # refused on the skeleton, nothing allocated


def test_state_dict_mismatch(net: UNet, tmp_path: Path) -> None:
    state = dict(net.state_dict())
    state.pop("head.conv.bias")
    with pytest.raises(
        CheckpointError, match=r"(?s)net\.pt: its weights do not match.*head\.conv\.bias"
    ):
        load(edited(net, tmp_path, state_dict=state))


def test_metrics_must_be_plain(net: UNet, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metrics\['model'\]"):
        save(net, tmp_path / "net.pt", metrics={"model": Payload()})


def test_fingerprint_tracks_every_weight(net: UNet) -> None:
    before = fingerprint(net)
    assert before == fingerprint(net)
    assert len(before) == 64
    with torch.no_grad():
        net.down[1].convs[2].weight[0, 0, 0, 0] += 1e-6
    assert fingerprint(net) != before


def test_fingerprint_covers_class_names_and_normalisation(net: UNet) -> None:
    renamed = models.build(
        "unet",
        class_names=["background", "tissue", "pen"],
        input_mean=net.input_mean,
        input_std=net.input_std,
        width=4,
        depth=2,
    )
    renamed.load_state_dict(net.state_dict())
    assert fingerprint(renamed) != fingerprint(net)


def zero_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    assert any(data[mid : mid + 64]), "the damage must change the file"
    return data[:mid] + bytes(64) + data[mid + 64 :]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        pytest.param(zero_middle, "damaged", id="64-bytes-zeroed-in-the-middle"),
        pytest.param(lambda data: data[: len(data) // 2], "cut short", id="truncated-to-half"),
        pytest.param(lambda data: data[:10], "cut short", id="truncated-to-10-bytes"),
    ],
)
def test_damaged_files_are_refused(
    net: UNet, tmp_path: Path, damage: Callable[[bytes], bytes], problem: str
) -> None:
    path = save(net, tmp_path / "net.pt")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"(?s){re.escape(str(path))}.*{problem}"):
        load(path)


def test_a_file_of_two_checkpoints_back_to_back_is_refused(tmp_path: Path) -> None:
    """zipfile checked the second archive's entries (the last end record names them, wherever
    they start), while torch, taking the record's offsets from the file's start, read the
    first's: a weight damaged in the first loaded as another model."""
    torch.manual_seed(0)
    first = save(models.build("fcn", width=2, layers=1), tmp_path / "first.pt").read_bytes()
    torch.manual_seed(1)
    second = save(models.build("fcn", width=2, layers=1), tmp_path / "second.pt").read_bytes()
    joined = tmp_path / "joined.pt"
    joined.write_bytes(first + second)
    assert zipfile.ZipFile(joined).testzip() is None  # the premise: zipfile finds it whole
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(joined))}.*starts {len(first):,} bytes"
    ):
        load(joined)


def test_a_flipped_byte_anywhere_is_refused_or_harmless(tmp_path: Path) -> None:
    """One byte flipped in a small checkpoint: load() refuses it naming the file, or (a flip
    in padding) loads the very model saved, never another one nor another error. An even
    stride over the whole file, and each entry's attributes in the zip's central directory
    (torch's reader takes an entry marked a folder for an empty one)."""
    torch.manual_seed(0)
    small = models.build("unet", class_names=["a", "b"], width=2, depth=1, padding="valid")
    path = save(small, tmp_path / "small.pt", metrics={"dice": 0.5})
    data = path.read_bytes()
    end = data.rfind(b"PK\x05\x06")  # the end-of-central-directory record
    at, attributes = int.from_bytes(data[end + 16 : end + 20], "little"), []
    # Each central directory entry: 46 bytes (attributes at 38), a name, an extra field, a comment.
    while data[at : at + 4] == b"PK\x01\x02":
        attributes.append(at + 38)
        at += 46 + sum(int.from_bytes(data[at + k : at + k + 2], "little") for k in (28, 30, 32))
    assert len(attributes) == len(zipfile.ZipFile(path).infolist())
    offsets = sorted({*range(0, len(data), len(data) // 400 + 1), *attributes})
    flipped = tmp_path / "flipped.pt"
    saved, wrong = (fingerprint(small), {"dice": 0.5}), []
    for i in offsets:
        flipped.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
        try:
            loaded = load(flipped)
        except CheckpointError as err:
            if str(flipped) not in str(err):
                wrong.append((i, f"unnamed: {err}"))
        except Exception as err:  # the test's point: no other class escapes
            wrong.append((i, repr(err)))
        else:
            if (fingerprint(loaded), loaded.checkpoint_metrics) != saved:
                wrong.append((i, "loaded another model"))
    assert not wrong, f"{len(wrong)} flips of {len(offsets)}, e.g. {wrong[:3]}"


def test_save_replaces_a_file_whole_or_not_at_all(
    net: UNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted save leaves the old file as it was (and no scratch file); a completed
    one replaces it."""
    from segpipe.models import checkpoint

    path = save(net, tmp_path / "net.pt", metrics={"run": 1})
    before = path.read_bytes()

    def interrupted(payload: object, file: Path) -> None:
        Path(file).write_bytes(b"PK half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(net, path, metrics={"run": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]
    save(net, path, metrics={"run": 2})
    assert load(path).checkpoint_metrics == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]


def test_save_refuses_urls_and_names_unwritable_paths(
    net: UNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("s3://bucket/net.pt", "memory://net.pt"):
        with pytest.raises(ValueError, match=re.escape(url) + ".*local files"):
            save(net, url)
    assert list(tmp_path.iterdir()) == [], "no local folder named s3: or memory:"
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(OSError, match=r"folder\.pt"):
        save(net, tmp_path / "folder.pt")
    assert (tmp_path / "folder.pt").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.pt"]
    if Path("/proc/self").is_dir():  # a folder that takes no new files, even from root
        with pytest.raises(OSError, match=r"/proc/segpipe-test\.pt cannot be written"):
            save(net, "/proc/segpipe-test.pt")


def as_int64(payload: dict[str, Any]) -> None:
    payload["state_dict"] = {k: v.to(torch.int64) for k, v in payload["state_dict"].items()}
    del payload["weights_dtype"]  # even a file that does not say must hold floating weights


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        pytest.param(as_int64, "int64", id="int64-weights"),
        pytest.param({"input_mean": [0.8, math.nan, 0.7]}, "input_mean", id="nan-mean"),
        pytest.param({"input_std": [0.1, math.inf, 0.12]}, "input_std", id="inf-std"),
        pytest.param({"input_std": [0.1, 0.0, 0.12]}, "input_std", id="zero-std"),
        # Bare errors before: OverflowError, one name a letter, NotImplementedError
        pytest.param({"input_std": 10**400}, "input_std .* NaN or infinite", id="huge-int-std"),
        pytest.param({"class_names": "ab"}, "class_names 'ab' are not a list", id="str-names"),
        pytest.param(
            lambda p: p["state_dict"].update(x=p["state_dict"]["head.conv.bias"].to_sparse()),
            "not a dict of named dense tensors",
            id="sparse-tensor",
        ),
        pytest.param({"input_std": "wide"}, "input_std", id="text-std"),
        pytest.param({"weights_dtype": "float16"}, "weights_dtype", id="weights-dtype-lies"),
        pytest.param({"weights_dtype": "uint8"}, "weights_dtype", id="weights-dtype-not-float"),
        pytest.param({"state_dict": [1.0, 2.0]}, "state_dict", id="list-state-dict"),
        pytest.param({"state_dict": {"x": 1.0}}, "state_dict", id="number-in-state-dict"),
        pytest.param({"metrics": [0.5]}, "metrics", id="list-metrics"),
        pytest.param({"name": ["unet"]}, "name", id="list-name"),
        pytest.param(
            {
                "pixel_contract": {
                    "channels": 3,
                    "scaling": "range",
                    "lo": [0.0, -math.inf, 0.0],
                    "hi": [1.0, 1.0, 1.0],
                    "mean": [0.5, math.nan, 0.5],
                }
            },
            "lo must be finite",
            id="infinite-contract",
        ),
        pytest.param(  # a bare OverflowError before
            {"pixel_contract": {"channels": 3, "pixel_size_um": 10**400}},
            "pixel contract .* is not valid",
            id="huge-int-contract",
        ),
    ],
)
def test_bad_entries_are_refused(
    net: UNet,
    tmp_path: Path,
    edit: dict[str, Any] | Callable[[dict[str, Any]], None],
    problem: str,
) -> None:
    path = save(net, tmp_path / "net.pt")
    payload = torch.load(path, weights_only=True)
    if callable(edit):
        edit(payload)
    else:
        payload.update(edit)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"(?s){re.escape(str(path))}.*{problem}"):
        load(path)


@pytest.mark.parametrize("name", sorted(models.shipped()))
def test_shipped_models_load(name: str) -> None:
    model = models.load(name)
    assert model.checkpoint_metrics
    assert all(p.dtype == torch.float32 for p in model.parameters())


# Pinned: results and archives key on the shipped models' fingerprints.
SHIPPED_FINGERPRINTS = {
    "aerial-unet": "12738cff30acd59c036cf2617f051c8806d943eaaf3bc4d7900bc1d92c5e0188",
    "tissue-unet": "aa7a1d8a1f60bf22798b51ab7fc64b9c430d5cbc1d99bff22ce8a4a967a6f3e8",
}


@pytest.mark.parametrize("name", sorted(SHIPPED_FINGERPRINTS))
def test_shipped_fingerprints_do_not_change(name: str) -> None:
    assert fingerprint(models.load(name)) == SHIPPED_FINGERPRINTS[name]


def _last(activation: torch.nn.Module) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), activation)


@pytest.mark.parametrize(
    "kind", ["eager", "wrapped", "traced", "scripted", "exported", "plain traced"]
)
def test_fingerprint_of_foreign_code_covers_the_code(kind: str) -> None:
    """The same weights behind other code (a ReLU or a Sigmoid after them): other outputs,
    another fingerprint; the same code again: the same."""
    x = torch.rand(1, 1, 4, 4)

    def prepared(activation: torch.nn.Module) -> torch.nn.Module:
        net: torch.nn.Module = _last(activation)
        if kind in ("traced", "plain traced"):
            net = torch.jit.trace(net, x)
        elif kind == "scripted":
            net = torch.jit.script(net)
        elif kind == "exported":
            net = torch.export.export(net, (x,)).module()
        if kind != "plain traced":  # a plain module, with a geometry, as segment() takes it
            return models.wrap(net, class_names=["a", "b"], geometry=Geometry(halo=0))
        net.geometry = Geometry(halo=0)  # type: ignore[assignment]
        return net

    relu, sigmoid = prepared(torch.nn.ReLU()), prepared(torch.nn.Sigmoid())
    with torch.no_grad():
        assert not torch.equal(relu(x), sigmoid(x))
    assert fingerprint(relu) != fingerprint(sigmoid)
    assert fingerprint(relu) == fingerprint(prepared(torch.nn.ReLU()))


_USER_NET = """
import torch
from torch import nn

SCALE = 1.0


def helper(t):
    return torch.HELPER(t)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        act = lambda t: torch.ACTIVATION(t)  # a nested code object: its repr has an address
        if x.dtype in {"int8", "uint8"}:  # a frozenset constant: ordered by the hash seed
            raise TypeError(x.dtype)
        return self.b(helper(act(self.a(x)))) * SCALE
"""


def _user_net(
    folder: Path, activation: str, *, scale: float = 1.0, act: str = "relu"
) -> torch.nn.Module:
    """The user's file ``user_net.py`` as edited to use ``activation``, its module's
    ``helper`` ``act`` and ``SCALE`` ``scale``, imported afresh."""
    import importlib.util

    folder.mkdir()
    path = folder / "user_net.py"
    code = _USER_NET.replace("ACTIVATION", activation).replace("HELPER", act)
    path.write_text(code.replace("SCALE = 1.0", f"SCALE = {scale}"), "utf-8")
    spec = importlib.util.spec_from_file_location("user_net", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.Net().eval()


def _closing_over(activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """One class, made in a function: its source reads the same for every activation."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return activation(self.a(x))

    torch.manual_seed(0)
    return Net().eval()


def test_fingerprint_of_a_wrapped_network_covers_its_forward(tmp_path: Path) -> None:
    """Only the class path, repr and weights were hashed: a forward edited between two runs
    (relu -> sigmoid, same weights) fingerprinted the same, and the re-run returned the old
    network's result as complete."""

    def wrapped(module: torch.nn.Module) -> str:
        return fingerprint(models.wrap(module, class_names=["a", "b"], halo=2, multiple=1))

    relu, sigmoid = _user_net(tmp_path / "v1", "relu"), _user_net(tmp_path / "v2", "sigmoid")
    assert type(relu).__qualname__ == type(sigmoid).__qualname__ == "Net"
    assert wrapped(relu) != wrapped(sigmoid)
    assert wrapped(relu) == wrapped(_user_net(tmp_path / "v3", "relu"))
    # A forward calling a function it closes over: that function's code.
    closure = _closing_over(torch.nn.functional.relu)
    assert fingerprint(closure) != fingerprint(_closing_over(lambda t: -torch.sigmoid(t)))
    assert fingerprint(closure) == fingerprint(_closing_over(torch.nn.functional.relu))
    # What forward reads of its module: a function it calls, a constant; the code running,
    # not the file (edited since import, or mid-edit and no Python at all)
    assert wrapped(_user_net(tmp_path / "v4", "relu", scale=3.0)) != wrapped(relu)
    assert wrapped(_user_net(tmp_path / "v5", "relu", act="tanh")) != wrapped(relu)
    (tmp_path / "v1" / "user_net.py").write_text("def broken(:\n", "utf-8")
    assert wrapped(relu) == wrapped(_user_net(tmp_path / "v6", "relu"))
    # Layers all torch's: their code is torch's version; fingerprints made before still hold.
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU())
    assert code_of(plain) == f"torch.nn.modules.container.Sequential\n{plain!r}"


_EXECUTED = """
import sys
import torch
from segpipe.models import fingerprint
code = open(sys.argv[1]).read().replace("ACTIVATION", sys.argv[2]).replace("HELPER", "relu")
namespace = {"__name__": "user_code"}
exec(compile(code, "<user code>", "exec"), namespace)  # no source to read: the bytecode
torch.manual_seed(0)
print(fingerprint(namespace["Net"]()))
"""


def test_fingerprint_of_code_without_source_is_its_bytecode(tmp_path: Path) -> None:
    """A class is hashed by its functions' bytecode, names and constants, a source or not
    (exec'd, a notebook's lost cell): the same in every run (no address, no set order of the
    run's hash seed), another for another forward."""
    import subprocess
    import sys

    (tmp_path / "net.py").write_text(_USER_NET, "utf-8")

    def digest(activation: str, seed: str) -> str:
        argv = [sys.executable, "-c", _EXECUTED, str(tmp_path / "net.py"), activation]
        env = {**os.environ, "PYTHONHASHSEED": seed}
        return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout

    assert digest("relu", "1") == digest("relu", "2") != digest("sigmoid", "1")


def test_fingerprint_warns_of_code_it_cannot_read() -> None:
    """A forward that is no Python function (a builtin): a warning that edits go unseen."""
    odd = type("Odd", (torch.nn.Module,), {"forward": torch.relu, "__module__": "no_such_file"})
    with pytest.warns(UserWarning, match=r"no_such_file\.Odd: its forward's code cannot be"):
        fingerprint(odd())


def test_a_subclass_of_a_registry_model_is_not_saved_as_its_parent(
    net: UNet, tmp_path: Path
) -> None:
    """It would load back as the parent, without its own logits."""

    class Negated(UNet):
        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return -super().logits(x)

    with pytest.raises(
        TypeError, match=r"Negated subclasses UNet and would load back as that.*never carries"
    ):
        save(Negated(net.config), tmp_path / "negated.pt")
    assert not (tmp_path / "negated.pt").exists()


def test_weights_beyond_float16_are_not_saved_as_half(net: UNet, tmp_path: Path) -> None:
    """float16 would store them as inf, which load() refuses: refused before writing."""
    with torch.no_grad():
        net.head.conv.bias[0] = 1e5
    with pytest.raises(ValueError, match=r"'head\.conv\.bias' reaches 100000.*half=False"):
        save(net, tmp_path / "half.pt", half=True)
    assert not (tmp_path / "half.pt").exists()
    assert load(save(net, tmp_path / "full.pt")).head.conv.bias[0] == 1e5
    with torch.no_grad():
        net.head.conv.bias[0] = math.nan
    with pytest.raises(ValueError, match=r"'head\.conv\.bias' holds NaN"):
        save(net, tmp_path / "nan.pt")


def test_a_contract_for_other_channels_is_not_saved(net: UNet, tmp_path: Path) -> None:
    net.pixel_contract = PixelContract(channels=1)  # the net takes 3
    with pytest.raises(ValueError, match=r"names 1 channels, the model takes 3"):
        save(net, tmp_path / "net.pt")
    assert not (tmp_path / "net.pt").exists()


def test_a_checkpoint_is_recorded_by_its_absolute_path_a_shipped_model_by_name(
    net: UNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """segment() recorded a relative checkpoint absolute, but an archive run (its loaded
    model's name) and evaluate() kept it as typed, relative to an unrecorded folder."""
    from segpipe import models
    from segpipe.archive.process import load_model

    save(net, tmp_path / "net.pt")
    monkeypatch.chdir(tmp_path)
    assert models.label_of("net.pt") == str(tmp_path / "net.pt")
    assert models.label_of(Path("net.pt")) == str(tmp_path / "net.pt")
    assert models.label_of("tissue-unet") == "tissue-unet"
    assert load_model("net.pt").name == str(tmp_path / "net.pt")


def test_fingerprint_covers_the_pixel_contract(net: UNet, tmp_path: Path) -> None:
    """The same weights fed other pixels (another dtype and scaling, another pixel size) are
    another model; a saved and loaded one keeps its fingerprint."""
    rgb = PixelContract(3, dtype="uint8", pixel_size_um=0.5)
    contracts = [
        None,
        rgb,
        PixelContract(3, dtype="uint8", pixel_size_um=0.25),
        PixelContract(3, dtype="uint16", scaling="range", lo=(0.0,) * 3, hi=(4095.0,) * 3),
    ]
    prints = []
    for contract in contracts:
        net.pixel_contract = contract
        prints.append(fingerprint(net))
    assert len(set(prints)) == len(contracts)
    net.pixel_contract = rgb
    assert fingerprint(load(save(net, tmp_path / "net.pt"))) == fingerprint(net)


def test_loading_a_checkpoint_leaves_torch_dynamo_unimported(tmp_path):
    """The skeleton a load builds on the meta device drew its He weights there, and torch's
    meta ``normal_`` imports torch._dynamo: 1.8 s of every process that loads a model (each
    CLI command that runs one, each training)."""
    import subprocess
    import sys

    paths = [
        str(models.save(models.build(name, class_names=("a", "b")), tmp_path / f"{name}.pt"))
        for name in models.REGISTRY
    ]
    code = (
        "import sys; from segpipe import models\n"
        f"for path in {paths!r}: models.load(path)\n"
        "print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
